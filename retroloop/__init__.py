"""retroloop: retrofit depth recurrence into a pretrained LLM and distil it back.

Importing the package registers the looped architecture (`RecurrentConfig`,
`RecurrentForCausalLM`) with transformers' Auto classes, so `AutoModelForCausalLM
.from_pretrained(dir)` and PEFT load a converted model after a bare `import retroloop`.
"""

from retroloop.models import recurrent as _recurrent  # noqa: F401  (registers the Auto classes)

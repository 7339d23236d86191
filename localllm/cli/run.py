"""``localllm run [MODEL] [PROMPT]``: stream an answer, or chat interactively."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from localllm.cli.options import float_range, int_range, model_options, model_settings

HELP_REPL = "commands: /reset clears the conversation, /exit quits; Ctrl-C stops an answer, Ctrl-D quits"


def _text_or_file(value: str | None, what: str) -> str | None:
    """``@PATH`` reads a file; anything else is the text itself."""
    if value is None or not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise click.BadParameter(f"cannot read {what} file {value[1:]!r}: {e.strerror}") from None


def _json_schema(value: str | None) -> Any:
    text = _text_or_file(value, "JSON schema")
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"--json-schema is not valid JSON: {e}") from None


def _logit_bias(pairs: tuple[str, ...]) -> dict[int, float] | None:
    out: dict[int, float] = {}
    for pair in pairs:
        tok, sep, val = pair.partition("=")
        try:
            out[int(tok)] = float(val)
        except ValueError:
            raise click.BadParameter(f"--logit-bias takes TOKEN_ID=BIAS, not {pair!r}") from None
        if not sep:
            raise click.BadParameter(f"--logit-bias takes TOKEN_ID=BIAS, not {pair!r}")
    return out or None


def sampling_options(f):
    """Every SamplingParams field as a flag (ranges from localllm.sampling)."""
    opts = [
        click.option("-n", "--max-tokens", type=int_range("max_tokens"), default=512, show_default=True),
        click.option("--temp", "temperature", type=float_range("temperature"), default=0.8, show_default=True),
        click.option("--top-p", type=float_range("top_p"), default=0.95, show_default=True),
        click.option("--top-k", type=int_range("top_k"), default=40, show_default=True),
        click.option("--min-p", type=float_range("min_p"), default=0.05, show_default=True),
        click.option("--repeat-penalty", type=float_range("repeat_penalty"), default=1.0, show_default=True),
        click.option("--presence-penalty", type=float_range("presence_penalty"), default=0.0, show_default=True),
        click.option("--frequency-penalty", type=float_range("frequency_penalty"), default=0.0,
                     show_default=True),
        click.option("--repeat-last-n", type=int_range("repeat_last_n"), default=64, show_default=True,
                     help="Tokens the penalties look back over (prompt included)."),
        click.option("--seed", type=int, default=None, help="Sampling seed (with --temp 0, output is reproducible)."),
        click.option("--stop", multiple=True, help="Stop at this string (repeatable)."),
        click.option("--grammar", default=None, help="GBNF grammar the output must follow (@FILE reads a file)."),
        click.option("--json-schema", default=None, help="JSON schema the output must match (@FILE reads a file)."),
        click.option("--logit-bias", multiple=True, metavar="TOKEN_ID=BIAS", help="Add BIAS to a token (repeatable)."),
        click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence."),
        click.option("--choices", "n", type=int_range("n"), default=1, show_default=True,
                     help="Independent answers (seeds SEED, SEED+1, ...); needs --json."),
        click.option("--best-of", type=int_range("best_of"), default=None,
                     help="Sample this many and keep the --choices most likely."),
        click.option("--num-beams", type=int_range("num_beams"), default=1, show_default=True,
                     help="Beam search with K beams (deterministic)."),
        click.option("--logprobs", "top_logprobs", type=int_range("top_logprobs"), default=None,
                     help="With --json: each token's log-probability and this many alternatives."),
        click.option("--reasoning-budget", type=int_range("reasoning_budget"), default=None,
                     help="A reasoning model thinks at most this many tokens (0: no thinking)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def sampling_from_flags(kw: dict[str, Any]) -> dict[str, Any]:
    """Flag values → SamplingParams keywords (validated by SamplingParams itself)."""
    top = kw.pop("top_logprobs")
    kw["logprobs"] = top is not None
    kw["top_logprobs"] = top or 0
    kw["stop"] = list(kw["stop"]) or None
    kw["grammar"] = _text_or_file(kw["grammar"], "grammar")
    kw["json_schema"] = _json_schema(kw["json_schema"])
    kw["logit_bias"] = _logit_bias(kw["logit_bias"])
    return kw


@click.command("run")
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@click.option("--chat/--raw", "chat", default=None,
              help="Use the model's chat template (default when it has one) or complete raw text.")
@click.option("--system", default=None, help="System message (chat mode).")
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, tokens, timings.")
@click.option("--hide-reasoning", is_flag=True, help="Do not show a reasoning model's thinking (shown dimmed).")
@model_options
@click.option("--repack/--no-repack", default=True, show_default=True,
              help="llama.cpp's repacked weights (faster Q4_0/Q4_K on AVX2).")
def command(model: str | None, prompt: str | None, chat: bool | None, system: str | None, as_json: bool,
            hide_reasoning: bool, n_ctx: int | None, n_threads: int | None, gpu_layers: int | str, gpu_memory: int | None,
            models_dir: str | None, cache_type_k: str, cache_type_v: str, flash_attn: str, prompt_cache: bool,
            speculate: str, prefill: str, repack: bool, mmap: bool | None, **flags: Any) -> None:
    """Stream an answer from MODEL (a .gguf path or a model name; default model if omitted).

    With no PROMPT on a terminal, start an interactive chat. PROMPT "-" reads stdin.
    """
    from localllm import Model, resolve
    from localllm.sampling import SamplingParams

    if model is not None and prompt is None and not resolve.is_model_ref(model, models_dir):
        model, prompt = None, model  # `localllm run "a question"`
    sampling = sampling_from_flags(flags)
    SamplingParams(**sampling)  # bad combinations fail before the model loads
    if (sampling["n"] > 1 or sampling["logprobs"]) and not as_json:
        raise click.UsageError("--choices and --logprobs print through --json")
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise click.UsageError("stdin was empty: nothing to answer")
    settings = model_settings(model, n_ctx, n_threads, gpu_layers, cache_type_k, cache_type_v,
                              flash_attn, prompt_cache, mmap, repack=repack, gpu_memory=gpu_memory,
                              speculate=speculate, prefill=prefill)
    with warnings.catch_warnings(record=True) as caught:  # the library warns; the CLI prints one line each
        warnings.simplefilter("always", RuntimeWarning)
        m = Model(settings=settings, models_dir=models_dir)
    for w in caught:
        click.echo(f"note: {w.message}", err=True)
    with m:
        use_chat = m.info.has_chat_template if chat is None else chat
        show = not hide_reasoning
        if prompt is None:
            _repl(m, use_chat, system, sampling, show)
            return
        if as_json:
            r = (m.chat_complete([{"role": "user", "content": prompt}], system=system, **sampling) if use_chat
                 else m.complete(prompt, **sampling))
            click.echo(json.dumps(_as_json(m, r), indent=2, ensure_ascii=False))
            return
        stream = (m.chat_stream([{"role": "user", "content": prompt}], system=system, reasoning=show, **sampling)
                  if use_chat else m.stream(prompt, **sampling))
        _show(stream, [])
        click.echo()


def _show(stream: Any, pieces: list[str]) -> None:
    """Print a stream's pieces as they come, a reasoning model's thinking dimmed (plain where the
    output is not a terminal) and a blank line before the answer, collecting the answer's in ``pieces``."""
    from localllm.model import Reasoning

    thinking = False
    for piece in stream:
        if isinstance(piece, Reasoning):
            thinking = True
            click.echo(click.style(str(piece), dim=True), nl=False)
        else:
            if thinking:
                click.echo("\n")
                thinking = False
            pieces.append(piece)
            click.echo(piece, nl=False)
        sys.stdout.flush()


def _lp(lps: Any) -> Any:
    if lps is None:
        return None
    return [{"token": lp.token, "text": lp.text, "logprob": lp.logprob,
             "top": [{"token": t, "logprob": v} for t, _, v in lp.top]} for lp in lps]


def _as_json(m: Any, r: Any) -> dict[str, Any]:
    out = {"model": m.info.name, "path": m.info.path, "text": r.text, "finish_reason": r.finish_reason,
           "tokens": r.tokens, **_timings(r)}
    if r.reasoning:
        out["reasoning"] = r.reasoning
    if r.logprobs is not None:
        out["logprobs"] = _lp(r.logprobs)
    if len(r.choices) > 1:
        out["choices"] = [{"index": c.index, "text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason,
                           "logprobs": _lp(c.logprobs)} for c in r.choices]
    return out


def _timings(r: Any) -> dict[str, Any]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens,
            "time_to_first_token_ms": round(r.time_to_first_token_s * 1000, 2),
            "prompt_tokens_per_s": round(r.prompt_tokens_per_s, 2),
            "generation_tokens_per_s": round(r.generation_tokens_per_s, 2)}


def _repl(m: Any, use_chat: bool, system: str | None, sampling: dict[str, Any], show: bool = True) -> None:
    from localllm.errors import LocalLLMError

    history: list[dict[str, str]] = []
    click.echo(f"{m.info.name} ({m.info.quant}, {m.info.context} tokens of context). {HELP_REPL}", err=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo(err=True)
            return
        except KeyboardInterrupt:  # at the prompt: clear the line, keep going
            click.echo(err=True)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return
        if cmd == "/reset":
            history.clear()
            click.echo("(conversation cleared)", err=True)
            continue
        if cmd in ("/help", "/?"):
            click.echo(HELP_REPL, err=True)
            continue
        if use_chat:
            history.append({"role": "user", "content": line})
        pieces: list[str] = []
        stream = None
        try:  # Ctrl-C stops the answer, whether it came before the first token or after
            stream = (m.chat_stream(history, system=system, reasoning=show, **sampling) if use_chat
                      else m.stream(line, **sampling))
            _show(stream, pieces)
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False, err=True)
        except LocalLLMError as e:  # one bad turn (too long, a template error) does not end the chat
            click.echo(f"error: {e.message}" + (f" (next: {e.hint})" if e.hint else ""), err=True)
            if use_chat:
                history.pop()
            continue
        finally:
            if stream is not None:
                stream.close()
        click.echo()
        if use_chat:
            _fit_history(m, history, "".join(pieces))


def _fit_history(m: Any, history: list[dict[str, str]], answer: str) -> None:
    from localllm.errors import ContextOverflowError

    history.append({"role": "assistant", "content": answer})
    # the next turn must still fit: drop the oldest exchanges if needed
    dropped = 0
    try:
        while len(history) > 2 and len(m.tokenize(m.render_chat(history), special=True)) > m.info.context * 3 // 4:
            del history[:2]
            dropped += 1
    except ContextOverflowError:
        history.clear()
    if dropped:  # say so: never shorten a conversation silently
        click.echo(f"(the {dropped} oldest exchange(s) no longer fit the context and were dropped)", err=True)

"""``localllm run [MODEL] [PROMPT]``: stream an answer, or chat interactively."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from localllm.cli.options import model_options

HELP_REPL = "commands: /reset clears the conversation, /exit quits; Ctrl-C stops an answer, Ctrl-D quits"


def _is_model_ref(arg: str, models_dir: str | None) -> bool:
    """Whether a lone positional argument names a model rather than a prompt."""
    from localllm import catalog, settings, store

    if arg.endswith(".gguf") or Path(arg).expanduser().is_file():
        return True
    try:
        name, _ = store.parse_ref(arg)
    except Exception:
        return False
    return name in catalog.BUILTIN or (settings.models_dir(models_dir) / name).is_dir()


@click.command("run")
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@click.option("--chat/--raw", "chat", default=None,
              help="Use the model's chat template (default when it has one) or complete raw text.")
@click.option("--system", default=None, help="System message (chat mode).")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temp", "temperature", type=click.FloatRange(min=0), default=0.8, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.95, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True)
@click.option("--min-p", type=click.FloatRange(min=0, max=1), default=0.05, show_default=True)
@click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (with --temp 0, output is reproducible).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text and timings.")
@model_options
def command(model: str | None, prompt: str | None, chat: bool | None, system: str | None, max_tokens: int,
            temperature: float, top_p: float, top_k: int, min_p: float, repeat_penalty: float, seed: int | None,
            as_json: bool, n_ctx: int | None, n_threads: int | None, gpu_layers: int | str,
            models_dir: str | None) -> None:
    """Stream an answer from MODEL (a .gguf path or a model name; default model if omitted).

    With no PROMPT on a terminal, start an interactive chat. PROMPT "-" reads stdin.
    """
    from localllm import Model

    if model is not None and prompt is None and not _is_model_ref(model, models_dir):
        model, prompt = None, model  # `localllm run "a question"`
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise click.UsageError("stdin was empty: nothing to answer")
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repeat_penalty=repeat_penalty, seed=seed)
    with Model(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=gpu_layers, seed=seed,
               models_dir=models_dir) as m:
        use_chat = m.info.has_chat_template if chat is None else chat
        if prompt is None:
            _repl(m, use_chat, system, sampling)
            return
        if use_chat:
            stream = m.chat_stream([{"role": "user", "content": prompt}], system=system, **sampling)
        else:
            stream = m.stream(prompt, **sampling)
        if as_json:
            for _ in stream:
                pass
            result = m.last
            click.echo(json.dumps({"model": m.info.name, "path": m.info.path, "text": result.text,
                                   "finish_reason": result.finish_reason, **_timings(result)}, indent=2))
            return
        for piece in stream:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()


def _timings(r: Any) -> dict[str, Any]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "time_to_first_token_ms": round(r.time_to_first_token_s * 1000, 2),
            "prompt_tokens_per_s": round(r.prompt_tokens_per_s, 2),
            "generation_tokens_per_s": round(r.generation_tokens_per_s, 2)}


def _repl(m: Any, use_chat: bool, system: str | None, sampling: dict[str, Any]) -> None:
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
            stream = m.chat_stream(history, system=system, **sampling)
        else:
            stream = m.stream(line, **sampling)
        pieces = []
        try:
            for piece in stream:
                pieces.append(piece)
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False, err=True)
        finally:
            stream.close()
        click.echo()
        if use_chat:
            from localllm.errors import ContextOverflowError

            history.append({"role": "assistant", "content": "".join(pieces)})
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

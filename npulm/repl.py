"""`npulm chat`: an interactive conversation in the terminal, as llama-cli's conversation mode.

Line editing and history through readline (arrow keys, Ctrl-R; kept in the npulm cache between sessions).
Ctrl-C during a reply stops the reply and returns to the prompt (the words so far stay in the conversation); a second
Ctrl-C, or Ctrl-C at an empty prompt twice, or Ctrl-D, leaves. /clear starts over, /exit leaves. With standard input
not a terminal, each line is one user message and errors make the exit status 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from . import assets
from .generate import ContextOverflow

HELP = "Enter sends. Ctrl-C stops a reply; Ctrl-C twice or Ctrl-D leaves. /clear starts over, /exit leaves."


def _interactive() -> bool:
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _readline_history() -> None:
    """Line editing and a history file, when the platform has readline."""
    try:
        import atexit
        import readline
    except ImportError:
        return
    path = assets.cache_dir() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def _warn_without_template(llm) -> None:
    template = llm.chat_template
    if "built-in fallback" in template.name:
        print(f"npulm: warning: this model has no chat template (tokenizer.chat_template), so the built-in "
              f"{template.name.split(' ')[0]} format is used. A base (not instruction-tuned) model does not follow "
              f"it and answers nonsense: use an instruct model (e.g. the default, {assets.DEFAULT_MODEL})",
              file=sys.stderr)


def _reply(llm, messages: list[dict], args: argparse.Namespace, sampling: dict[str, Any]) -> tuple[str, bool]:
    """Stream one reply to stdout; (its text, whether Ctrl-C stopped it). A second Ctrl-C raises KeyboardInterrupt.

    The first Ctrl-C only sets a flag, checked between tokens, so that no model state is cut mid-computation."""
    interrupts = [0]

    def on_sigint(signum, frame):
        interrupts[0] += 1
        if interrupts[0] > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    stream = None
    reply = ""
    try:
        stream = llm.create_chat_completion(messages, max_tokens=args.n_predict, stream=True, **sampling)
        for chunk in stream:
            delta = chunk["choices"][0]["delta"].get("content", "")
            reply += delta
            print(delta, end="", flush=True)
            if interrupts[0]:
                break
    finally:
        signal.signal(signal.SIGINT, previous)
        if stream is not None:
            stream.close()
    print(flush=True)
    return reply, bool(interrupts[0])


def chat(llm, args: argparse.Namespace, sampling: dict[str, Any]) -> int:
    interactive = _interactive()
    _warn_without_template(llm)
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages = list(system)
    if interactive:
        _readline_history()
        print(HELP, file=sys.stderr)
        # Ctrl-C must reach input() even when whatever started npulm ignored SIGINT (Python then keeps SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    status, pressed = 0, False
    while True:
        try:
            line = input("\n> ") if interactive else sys.stdin.readline()
        except EOFError:
            print()
            return status
        except KeyboardInterrupt:
            if pressed:
                print()
                return status
            pressed = True
            try:  # the second Ctrl-C may come while the hint is printed, before input() waits again
                print("\n(Ctrl-C again or Ctrl-D to leave)", file=sys.stderr)
            except KeyboardInterrupt:
                print()
                return status
            continue
        pressed = False
        if not interactive and not line:
            return status
        text = line.strip()
        if text in ("/exit", "/quit", "/bye"):
            return status
        if text == "/clear":
            messages = list(system)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            reply, stopped = _reply(llm, messages, args, sampling)
        except ValueError as e:  # the conversation outgrew the context, or the template refused it
            messages.pop()
            said = " ".join(str(e).split())
            if isinstance(e, ContextOverflow):
                said = f"the conversation no longer fits the context of {llm.n_ctx()} tokens (-c): {said}"
            print(f"npulm: error: {said}" + (" (/clear starts over)" if interactive else ""), file=sys.stderr)
            status = 1
            continue
        if stopped:
            print("(stopped)", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})

"""The `llmkit` command: registers the commands and turns llmkit's errors into one line and an exit code (llmkit/errors.py).

No logic lives here, and nothing heavy is imported, so `llmkit --help` answers instantly.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import typer

from llmkit import __version__
from llmkit.commands.chat import chat
from llmkit.commands.distill import distill
from llmkit.commands.evaluate import evaluate
from llmkit.commands.finetune import finetune
from llmkit.commands.generate import generate
from llmkit.commands.models import models
from llmkit.commands.prepare import prepare
from llmkit.commands.quantize import quantize
from llmkit.commands.serve import serve
from llmkit.errors import DiskError, Interrupted, LlmkitError

app = typer.Typer(
    name="llmkit",
    help="Generate, fine-tune, distill, quantize and evaluate Hugging Face language models.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help text: "[default: 8]" in a help string is text, not a Rich style tag
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(generate)
app.command()(chat)
app.command()(prepare)
app.command()(finetune)
app.command()(distill)
app.command()(quantize)
app.command()(evaluate)
app.command()(models)
app.command()(serve)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Generate, fine-tune, distill, quantize and evaluate Hugging Face language models."""


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM outside a training loop (which checkpoints first): unwind like Ctrl-C, so temp files are cleaned up."""
    raise Interrupted("terminated by SIGTERM", signum)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every expected failure is one line on stderr, never a traceback."""
    import warnings

    # Library deprecation notices are for llmkit's developers, not its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # bitsandbytes logs this on import on AVX512-BF16 CPUs when an optional kernel package is absent, in every
    # command, 4-bit or not; its fallback works. Only that message is dropped, bitsandbytes' others still show.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "gemm_4bit_forward" not in r.getMessage())
    # torchao (int8 folders), imported by transformers and peft whenever it is installed, logs "Failed to load
    # ..._C_mxfp8...so" for CUDA kernels on CPU-only torch, and torch warns about its Enum registrations: two
    # messages with no action for the user, on every command. Only those two are dropped.
    logging.getLogger("torchao").addFilter(lambda r: not r.getMessage().startswith("Failed to load"))
    logging.getLogger("torch.utils._pytree").addFilter(lambda r: "register_constant()" not in r.getMessage())
    args = sys.argv[1:] if argv is None else argv
    if not sys.stderr.isatty() or "--quiet" in args or "-q" in args:
        # library bars (downloads, "Writing model shards") follow llmkit's rule: none in logs or with --quiet
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        app(args=argv, prog_name="llmkit")
    except LlmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BrokenPipeError:  # `llmkit generate ... | head` closed the pipe: not an error
        sys.stderr.close()
        sys.exit(0)
    except Exception as e:
        # a full disk or a read-only folder (saving a model, a tokenizer, a report): still one line, not a traceback
        err = DiskError.classify(e, "the output")
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

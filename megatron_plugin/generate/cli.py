"""`python -m megatron_plugin.generate`: text from a training checkpoint or a Hugging Face folder.

    python -m megatron_plugin.generate --checkpoint runs/smoke "Story 3: 3 4"          # streams
    python -m megatron_plugin.generate --checkpoint runs/smoke --prompts prompts.jsonl > out.jsonl
    echo "Story 9:" | python -m megatron_plugin.generate --checkpoint runs/smoke --temperature 0.8
    torchrun --nproc-per-node 2 -m megatron_plugin.generate --checkpoint runs/smoke --tensor-parallel 2 "..."
    python -m megatron_plugin.generate --checkpoint runs/sft --chat --system "Be brief."     # conversation
    python -m megatron_plugin.generate --checkpoint runs/sft --messages chats.jsonl > replies.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from megatron_plugin.generate.engine import DEFAULT_SEED, SamplingOptions
from megatron_plugin.generate.console import quiet_libraries, run_cli
from megatron_plugin.generate.errors import GenerateError
from megatron_plugin.generate.prompts import (Streamer, chat_record, parse_prompt_lines, read_messages_file,
                                              read_prompts_file, result_record, write_jsonl)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_plugin.generate",
        description="Generate text from a training checkpoint (RUN, RUN/checkpoints, iter_N; any "
                    "TP/PP layout) or a Hugging Face Llama folder.",
    )
    parser.add_argument("prompt", nargs="*", help="prompt text (one streams to the console); none: --prompts or stdin")
    parser.add_argument("--checkpoint", "-c", required=True, help="RUN, RUN/checkpoints, iter_N or an HF folder")
    parser.add_argument("--prompts", help="file with one prompt per line, or JSONL with a 'prompt' key")
    parser.add_argument("--output", "-o", help="write JSONL results here instead of stdout")
    parser.add_argument("--max-new-tokens", "-n", type=int, default=64)
    parser.add_argument("--temperature", "-t", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0: off)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampling seed (same seed, same text)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when the completion contains TEXT (repeatable); the completion ends before it")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--logprobs", action="store_true", help="add per-token log-probabilities to JSONL results")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--tensor-parallel", "--tp", type=int, default=None,
                        help="tensor-parallel size (default: the number of processes / pipeline size)")
    parser.add_argument("--pipeline-parallel", "--pp", type=int, default=1)
    parser.add_argument("--jsonl", action="store_true",
                        help="JSONL on stdout also for prompts given as arguments; with --chat, one record per "
                             "turn instead of the streamed reply")
    chat = parser.add_argument_group("chat (the package's chat template; the tokenizer needs its control pieces)")
    chat.add_argument("--chat", action="store_true",
                      help="a conversation: type user turns at 'user> ' (with stdin not a terminal, one turn per "
                           "line); /reset clears the history, /exit or Ctrl-D ends, Ctrl-C stops a reply")
    chat.add_argument("--messages", metavar="FILE.jsonl",
                      help='scripted conversations, one {"messages": [...]} per line, the last message the '
                           "user's; JSONL replies on stdout or --output")
    chat.add_argument("--system", metavar="TEXT",
                      help="system message of --chat (and of --messages conversations that have none)")
    return parser


def _prompts(args) -> tuple[List[str], bool]:
    """(prompts, from_file_or_stdin)."""
    if args.prompt and args.prompts:
        raise GenerateError("give prompts as arguments or with --prompts FILE, not both")
    if args.prompts:
        return read_prompts_file(args.prompts), True
    if args.prompt:
        for text in args.prompt:
            if not text.strip():
                raise GenerateError("an empty prompt argument ('') was given: give it some text")
        return list(args.prompt), False
    if sys.stdin.isatty():
        raise GenerateError("no prompt: pass prompt text, --prompts FILE, or pipe prompts on stdin")
    return parse_prompt_lines(sys.stdin.read().splitlines(), "stdin"), True


def _layout(args) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pp = args.pipeline_parallel
    tp = args.tensor_parallel or max(world // max(pp, 1), 1)
    if tp < 1 or pp < 1:
        raise GenerateError(f"--tensor-parallel {tp} / --pipeline-parallel {pp}: sizes must be >= 1")
    if tp * pp != world:
        raise GenerateError(
            f"--tensor-parallel {tp} x --pipeline-parallel {pp} = {tp * pp} but {world} processes run: "
            f"start {tp * pp} processes (torchrun --nproc-per-node {tp * pp}) or change the sizes"
        )
    return tp, pp


def _check_chat_args(args) -> None:
    chat_mode = args.chat or args.messages
    if args.system is not None and not chat_mode:
        raise GenerateError("--system applies to --chat and --messages: add one of them")
    if not chat_mode:
        return
    if args.chat and args.messages:
        raise GenerateError("--chat and --messages together: pick the conversation on the terminal or the file")
    flag = "--chat" if args.chat else "--messages"
    if args.prompt or args.prompts:
        raise GenerateError(f"{flag} takes no prompt text or --prompts: the prompt is the conversation")
    if args.logprobs:
        raise GenerateError(f"--logprobs is not available with {flag}")
    if args.system is not None and not args.system.strip():
        raise GenerateError("--system '': give the system message some text, or leave --system out")
    if args.chat and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GenerateError("--chat reads the terminal in one process: run it without torchrun (--messages "
                            "works under torchrun)")


def _load_chat(args):
    from megatron_plugin.chat.template import ChatTemplateError
    from megatron_plugin.generate.chat import load_chat_generator

    tp, pp = _layout(args)
    try:
        return load_chat_generator(args.checkpoint, args.dtype, tp, pp)
    except ChatTemplateError as err:
        raise GenerateError(f"--checkpoint {args.checkpoint}: {err}") from None


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _messages_main(args, options: SamplingOptions) -> int:
    conversations = read_messages_file(args.messages, args.system)  # bad lines fail before the load
    chat = _load_chat(args)
    for where, messages in conversations:
        chat.check_fits(chat.tokenizer.generation_prompt(messages), options.max_new_tokens, where)
    replies = chat.reply([m for _, m in conversations], options, batch_size=args.batch_size)
    if int(os.environ.get("RANK", "0")) == 0:
        records = (chat_record(m, r) for (_, m), r in zip(conversations, replies))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as out:
                write_jsonl(records, out)
        else:
            write_jsonl(records, sys.stdout)
    return 0


def _chat_main(args, options: SamplingOptions) -> int:
    from megatron_plugin.generate.chat import ChatSession

    chat = _load_chat(args)
    session = ChatSession(chat, options, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            importlib.import_module("readline")  # line editing and history for input()
        except ImportError:
            pass
        _note(f"chat with {args.checkpoint}: /reset clears the history, /exit or Ctrl-D ends, "
              "Ctrl-C stops a reply")
    stream_replies = not args.jsonl
    transcript = open(args.output, "w", encoding="utf-8") if args.output else (None if stream_replies else sys.stdout)
    failed = False
    try:
        while True:
            try:
                line = input("user> " if interactive else "")
            except EOFError:
                if interactive:
                    print()
                break
            except KeyboardInterrupt:
                if not interactive:
                    break
                print()
                _note("(/exit or Ctrl-D ends the chat)")
                continue
            command = line.strip()
            if not command:
                continue
            if command == "/exit":
                break
            if command == "/reset":
                session.reset()
                _note("(history cleared)")
                continue
            try:
                conversation, dropped = session.fit(line)
            except GenerateError as err:
                _note(f"error: {' '.join(str(err).split())}")
                failed = True
                continue
            if dropped:
                _note(f"(history: dropped the oldest {dropped} message{'s' if dropped > 1 else ''} to fit the "
                      f"model's context of {chat.max_sequence_length} tokens with --max-new-tokens "
                      f"{options.max_new_tokens}{'; the system message is kept' if args.system else ''})")
            streamer = Streamer(chat.tokenizer, sys.stdout) if stream_replies else None
            turn = session.answer(conversation, dropped, on_token=streamer)
            if streamer is not None:
                streamer.finish(turn.reply)
            if turn.interrupted:
                _note("(reply stopped)")
            elif turn.reply.finish_reason == "length":
                _note(f"(the reply reached --max-new-tokens {options.max_new_tokens} before it ended its turn)")
            if not turn.kept:
                _note("(empty reply: this turn is not kept in the history)")
            if transcript is not None:
                write_jsonl([chat_record(turn.messages, turn.reply)], transcript)
    finally:
        if transcript is not None and transcript is not sys.stdout:
            transcript.close()
    return 2 if failed and not interactive else 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()

    def body() -> int:
        from megatron_plugin.generate.api import load_generator

        options = SamplingOptions(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), stop_at_eos=not args.ignore_eos,
            logprobs=args.logprobs,
        )
        options.check()
        if args.batch_size < 1:
            raise GenerateError(f"--batch-size {args.batch_size}: must be at least 1")
        _check_chat_args(args)
        if args.messages:
            return _messages_main(args, options)
        if args.chat:
            return _chat_main(args, options)
        prompts, from_file = _prompts(args)
        tp, pp = _layout(args)
        generator = load_generator(args.checkpoint, args.dtype, tp, pp)
        main_rank = int(os.environ.get("RANK", "0")) == 0
        as_jsonl = from_file or args.jsonl or args.output or len(prompts) > 1
        if not as_jsonl:
            stream = Streamer(generator.tokenizer, sys.stdout) if main_rank else None
            if stream is not None:
                sys.stdout.write(prompts[0])
                sys.stdout.flush()
            [result] = generator.generate_text(prompts, options, on_token=(lambda i, g: stream(i, g)) if stream else None)
            if stream is not None:
                stream.finish(result)
            return 0
        results = generator.generate_text(prompts, options, batch_size=args.batch_size)
        if main_rank:
            records = (result_record(p, r) for p, r in zip(prompts, results))
            if args.output:
                with open(args.output, "w", encoding="utf-8") as out:
                    write_jsonl(records, out)
            else:
                write_jsonl(records, sys.stdout)
        return 0

    return run_cli(body)

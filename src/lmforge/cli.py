"""`lmforge <command>`: the command line. Flags and --help come from the config dataclasses
(through jsonargparse), and every command accepts a YAML config file with --config.

This is the only module that exits: a user-fixable error (``LmforgeError``) becomes one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from .config import (
    DEFAULT_RECIPE,
    GGUF_EXPORT_TYPES,
    PRESETS,
    RECIPES,
    DataConfig,
    FinetuneConfig,
    LmforgeError,
    LoRAConfig,
    ModelConfig,
    SampleConfig,
    Terminated,
    TokenizerConfig,
    TrainConfig,
    one_line,
    recipe_configs,
)

COMMANDS = ("run", "tokenizer", "prepare", "pretrain", "finetune", "classify", "merge-lora", "generate", "chat",
            "serve", "eval", "export", "download", "report")
OVERWRITE_HELP = "write even where --out holds something that is not this command's own output"
# Arguments given by place, not by flag: named in an error as the help shows them.
_POSITIONAL = {"run": "the model (RUN, the first argument)", "models": "the models (MODELS, the first arguments)",
               "responses": "the responses file (RESPONSES, the first argument)"}
_GROUPS = {"tokenizer": ("train", "encode", "decode"), "finetune": ("classify", "instruct", "dpo"),
           "eval": ("prompt", "judge", "choice", "suite")}  # commands with subcommands, for the help to point at
EVAL_COMMANDS = ("eval-prompt", "eval-judge", "eval-choice", "eval-suite")  # `lmforge eval prompt` etc.
MODEL_HELP = "a run directory, a Hugging Face folder, a .gguf file or a known model name (see `lmforge download`)"


@functools.lru_cache(maxsize=1)
def _parser():  # built once per process: building it parses every config docstring (~0.2 s)
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # help text = the dataclass field docs

    def sub_parser(description: str) -> ArgumentParser:
        p = ArgumentParser(description=description, exit_on_error=False)
        p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
        return p

    def decoding_flags(p: ArgumentParser) -> None:  # generate, chat and serve run the model alike
        p.add_argument("--dtype", type=str, default="float32", help="float32, bfloat16 or auto (bf16 where the "
                       "hardware is fast at it)")
        p.add_argument("--quantize", type=str | None, default=None, help="int8: weight-only int8 matrices (a "
                       "quarter of fp32's bytes per token; lossy, see quantize.py)")
        p.add_argument("--compile", type=bool, default=False, help="decode through torch.compile (the first "
                       "generation of each shape pays the compilation)")

    def launch_flags(p: ArgumentParser) -> None:  # pretrain and finetune: the same command on many processes
        p.add_argument("--devices", type=int | None, default=None,
                       help="processes per machine (one per GPU; on CPUs, each gets its share of the cores): "
                            "relaunches this command under torchrun; --train.batch_size stays the global batch")
        p.add_argument("--nnodes", type=int, default=1, help="machines in the job (each runs the same command)")
        p.add_argument("--node_rank", type=int | None, default=None, help="this machine's index, 0..nnodes-1 "
                       "(optional: the rendezvous assigns one)")
        p.add_argument("--rdzv_endpoint", type=str | None, default=None,
                       help="HOST:PORT where the machines meet (with --nnodes > 1), the same on all of them")

    root = ArgumentParser(prog="lmforge", exit_on_error=False,
                          description="Build a large language model from scratch. Without a command, runs `run`.")
    cmds = root.add_subcommands(dest="command", required=True)

    p = sub_parser("The built-in default: train a tokenizer, prepare shards, pretrain a small GPT (about five "
                   "minutes on 2 CPU cores), evaluate it and sample from it. Runs offline on a laptop CPU; run "
                   "again after an interruption, it resumes.")
    p.add_argument("--data", type=str, nargs="+", default=None,
                   help="text files, directories or JSONL files (default: English text that ships with Python)")
    p.add_argument("--out", type=str, default="runs/default", help="output directory")
    p.add_argument("--steps", type=int, default=1000,
                   help="pretraining steps of 16 x 128 tokens (fixed work: the same model on every machine)")
    p.add_argument("--max_minutes", type=float, default=15.0,
                   help="guard: stop pretraining early, with a checkpoint and a note, if it takes longer than this")
    p.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--preset", type=str, default="gpt-micro", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--recipe", type=str | None, default=DEFAULT_RECIPE,
                   help=f"training recipe at the preset's shape: {', '.join(RECIPES)} (benchmarks/quality.py); null: "
                        "GPT-2 blocks with AdamW 2e-3, warm-up + cosine (the default run before the recipes)")
    p.add_argument("--fourway_limit", type=int, default=300,
                   help="texts of SMS spam on which the pretrained SmolLM2-135M is adapted four ways in the last stage "
                        "(at most 1284; 0 leaves the stage out)")
    cmds.add_subcommand("run", p, help="the built-in end-to-end default run")

    tok = ArgumentParser(description="Train, or use, a byte-level BPE tokenizer.", exit_on_error=False)
    cmds.add_subcommand("tokenizer", tok, help="train / encode / decode with a BPE tokenizer")
    tok_cmds = tok.add_subcommands(dest="action", required=True)
    p = sub_parser("Train a byte-level BPE tokenizer on text files.")
    p.add_argument("--data", type=str, nargs="+", required=True, help="text files, directories or JSONL files")
    p.add_argument("--out", type=str, required=True, help="where to write tokenizer.json")
    p.add_argument("--overwrite", type=bool, default=False, help=OVERWRITE_HELP)
    p.add_class_arguments(TokenizerConfig, "tokenizer")
    p.add_class_arguments(DataConfig, "text")
    tok_cmds.add_subcommand("train", p, help="train a tokenizer")
    p = sub_parser("Encode text to token ids (reads stdin when --text is absent).")
    p.add_argument("--tokenizer", type=str, required=True, help="tokenizer.json or a run directory")
    p.add_argument("--text", type=str | None, default=None)
    p.add_argument("--allow_special", type=bool, default=False, help="encode special-token strings as their ids")
    tok_cmds.add_subcommand("encode", p, help="text -> ids")
    p = sub_parser("Decode token ids to text (reads stdin when --ids is absent).")
    p.add_argument("--tokenizer", type=str, required=True, help="tokenizer.json or a run directory")
    p.add_argument("--ids", type=str | None, default=None, help="space- or comma-separated ids")
    tok_cmds.add_subcommand("decode", p, help="ids -> text")

    p = sub_parser("Tokenize text files into train/validation token shards.")
    p.add_argument("--data", type=str, nargs="+", required=True, help="text files, directories or JSONL files")
    p.add_argument("--tokenizer", type=str, required=True, help="tokenizer.json (from `lmforge tokenizer train`)")
    p.add_argument("--out", type=str, required=True, help="directory for train.bin, val.bin, index.json")
    p.add_argument("--force", type=bool, default=False, help="rebuild even if the inputs are unchanged")
    p.add_argument("--overwrite", type=bool, default=False, help=OVERWRITE_HELP)
    p.add_class_arguments(DataConfig, "text")
    cmds.add_subcommand("prepare", p, help="text -> token shards")

    p = sub_parser("Pretrain a GPT on prepared token shards. --model.* flags override the preset.")
    p.add_argument("--data", type=str | None, default=None,
                   help="directory written by `lmforge prepare` (on --resume: the run's own data by default)")
    p.add_argument("--out", type=str, required=True, help="run directory (weights, config, metrics, plots)")
    p.add_argument("--preset", type=str, default="gpt-micro", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--recipe", type=str | None, default=None,
                   help=f"a training recipe ({', '.join(RECIPES)}): its architecture options and optimiser settings at "
                        "the preset's shape; --model.* and --train.* flags given still win")
    p.add_argument("--resume", type=bool, default=False,
                   help="continue the run in --out from its newest complete checkpoint, with its own settings; "
                        "flags given change them (max_steps, intervals, time cap: announced; anything else: refused "
                        "unless --allow_changes)")
    p.add_argument("--allow_changes", type=bool, default=False,
                   help="on --resume, accept settings that make the result differ from an uninterrupted run "
                        "(learning rate, batch, model, data)")
    p.add_argument("--overwrite", type=bool, default=False,
                   help="start over in an --out that already holds a run (its checkpoints and metrics are deleted)")
    p.add_argument("--prompts", type=list[str], default=["The"], help="prompts sampled at the start and the end")
    _model_overrides(p)
    p.add_class_arguments(TrainConfig, "train")
    launch_flags(p)
    cmds.add_subcommand("pretrain", p, help="pretrain a GPT")

    ft = ArgumentParser(description="Fine-tune a pretrained model on a task (the one training loop underneath).",
                        exit_on_error=False)
    cmds.add_subcommand("finetune", ft, help="fine-tune: classify, instruct, dpo")
    ft_cmds = ft.add_subcommands(dest="task", required=True)

    def finetune_parser(description: str, finetune: dict, train: dict) -> ArgumentParser:
        p = sub_parser(description)
        p.add_argument("--base", type=str | None, default=None,
                       help="the model to start from: " + MODEL_HELP + " (on --resume: the run's own by default)")
        p.add_argument("--data", type=str | None, default=None,
                       help="the data file (on --resume: the run's own by default)")
        p.add_argument("--out", type=str, required=True, help="run directory (weights or adapters, config, metrics)")
        p.add_argument("--resume", type=bool, default=False, help="continue the run in --out from its newest checkpoint")
        p.add_argument("--overwrite", type=bool, default=False, help="start over in an --out that holds a run")
        p.add_argument("--allow_changes", type=bool, default=False,
                       help="with --resume: continue even with settings that differ from the run's own")
        p.add_class_arguments(FinetuneConfig, "finetune")
        p.add_class_arguments(LoRAConfig, "lora")
        p.add_class_arguments(TrainConfig, "train")
        launch_flags(p)
        p.set_defaults({**{f"finetune.{k}": v for k, v in finetune.items()},
                        **{f"train.{k}": v for k, v in train.items()}})
        return p

    p = finetune_parser("Classification (the book's chapter 6): a new classes head read at each text's last token. "
                        "Data: CSV, TSV, JSON or JSONL with a text and a label column.",
                        {}, {"lr": 5e-5, "warmup_steps": 0, "eval_interval": 10**6, "save_interval": 10**6})
    p.add_argument("--text_column", type=str, default="text", help="the text column: a name, or a number from 0 "
                   "for a file without a header")
    p.add_argument("--label_column", type=str, default="label", help="the label column (a name or a number)")
    p.add_argument("--balance", type=bool, default=False, help="down-sample every class to the smallest one's size")
    p.add_argument("--pad_to", type=int | None, default=None,
                   help="pad every batch to this many tokens (default: to the longest text in the batch)")
    ft_cmds.add_subcommand("classify", p, help="fine-tune a classifier")
    p = finetune_parser("Instruction following (the book's chapter 7): Alpaca records (instruction, input, output) "
                        "or chat records (messages), JSON or JSONL.",
                        {"trainable": "all", "epochs": 2.0, "split": (0.85, 0.05, 0.10)},
                        {"lr": 5e-5, "warmup_steps": 0, "eval_interval": 10**6, "save_interval": 10**6})
    p.add_argument("--template", type=str | None, default=None, help="prompt template: alpaca, phi3 or chat (the "
                   "model's own chat template); default: the one the base was tuned on, else alpaca")
    p.add_argument("--mask_prompt", type=bool, default=False, help="learn only the responses, not the prompts")
    p.add_argument("--respond_test", type=int | None, default=None,
                   help="generate responses for this many test records (default: all) into responses.json")
    p.add_argument("--max_new_tokens", type=int, default=128, help="longest generated response")
    ft_cmds.add_subcommand("instruct", p, help="instruction fine-tuning")
    p = finetune_parser("Preference tuning with DPO: records with a prompt (instruction / input, or prompt), "
                        "chosen and rejected answers.",
                        {"trainable": "all", "epochs": 1.0, "split": (0.85, 0.05, 0.10)},
                        {"lr": 5e-6, "warmup_steps": 0, "weight_decay": 0.01, "eval_interval": 10**6,
                         "save_interval": 10**6})
    p.add_argument("--template", type=str | None, default=None, help="prompt template: alpaca, phi3 or chat; "
                   "default: the one the base was tuned on, else alpaca")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta: how far the model may move from its start")
    ft_cmds.add_subcommand("dpo", p, help="preference tuning (DPO)")

    p = sub_parser("Classify texts with a classification run (labels with probabilities).")
    p.add_argument("run", type=str, help="a run directory of `lmforge finetune classify`")
    p.add_argument("texts", type=str, nargs="*", default=[], help="texts to classify")
    p.add_argument("--file", type=str | None, default=None, help="a file with one text per line")
    cmds.add_subcommand("classify", p, help="label texts with a classification run")

    p = sub_parser("Fold a LoRA run's adapters into its base weights: a run directory of full weights.")
    p.add_argument("run", type=str, help="a run directory fine-tuned with --finetune.trainable lora")
    p.add_argument("--out", type=str, required=True, help="a new folder for the merged run")
    cmds.add_subcommand("merge-lora", p, help="merge LoRA adapters into the weights")

    p = sub_parser("Generate text from a model.")
    p.add_argument("run", type=str, help=MODEL_HELP)
    p.add_argument("--prompt", type=str | None, default=None, help="text to continue (default: standard input "
                   "when it is a pipe or a file, else an empty prompt: a new document)")
    p.add_argument("--chat", type=bool, default=False, help="wrap the prompt in the model's chat template")
    decoding_flags(p)
    p.add_class_arguments(SampleConfig, "sample")
    # Like most sampling tools, a fresh seed each time; --sample.seed N reproduces a sample.
    p.set_defaults({"sample.seed": None})
    cmds.add_subcommand("generate", p, help="sample text from a model")

    p = sub_parser("Chat with a model in the terminal: streamed answers, the conversation kept within the context "
                   "(oldest turns dropped with a notice), /reset, /system TEXT, /exit, Ctrl-C stops an answer.")
    p.add_argument("run", type=str, help=MODEL_HELP)
    p.add_argument("--template", type=str | None, default=None, help="chat, alpaca or phi3 (default: the template "
                   "the model was tuned on, else its own chat template, else alpaca)")
    p.add_argument("--system", type=str | None, default=None, help="a system message")
    decoding_flags(p)
    p.add_class_arguments(SampleConfig, "sample")
    p.set_defaults({"sample.seed": None, "sample.max_new_tokens": 256, "sample.temperature": 0.7})
    cmds.add_subcommand("chat", p, help="chat with a model in the terminal")

    p = sub_parser("Serve a model over HTTP: an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                   "/v1/models, streamed or not) and a chat page at /. Concurrent requests are decoded together "
                   "in batches.")
    p.add_argument("run", type=str, help=MODEL_HELP)
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; "
                   "give --api_key then)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--api_key", type=str | None, default=None,
                   help="require this key from clients (header Authorization: Bearer KEY)")
    p.add_argument("--max_batch", type=int, default=8, help="most answers decoded together in one batch")
    p.add_argument("--template", type=str | None, default=None, help="chat, alpaca or phi3 (default: the template "
                   "the model was tuned on, else its own chat template, else alpaca)")
    p.add_argument("--request_timeout", type=float, default=60.0, help="seconds a client has to send one whole "
                   "request, headers and body, and to take some of an answer once the buffers are full; a slower "
                   "one is disconnected (answers may take longer)")
    decoding_flags(p)
    cmds.add_subcommand("serve", p, help="OpenAI-compatible HTTP API and chat page")

    p = sub_parser("Loss and perplexity of a model on a prepared shard set, or bits per byte on text files. "
                   "See also `lmforge eval prompt` (zero-/few-shot classification), `lmforge eval judge` "
                   "(score instruction responses with a judge model), `lmforge eval choice` (multiple choice by "
                   "log-likelihood) and `lmforge eval suite` (models x tasks, one table).")
    p.add_argument("run", type=str, help=MODEL_HELP)
    p.add_argument("--data", type=str | None, default=None, help="directory written by `lmforge prepare`")
    p.add_argument("--text", type=str, nargs="+", default=None,
                   help="text files to score in bits per byte (works for any tokenizer)")
    p.add_argument("--split", type=str, default="val", help="'val' or 'train'")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_batches", type=int, default=50)
    p.add_argument("--context", type=int | None, default=None, help="window length (default: the model's)")
    p.add_argument("--dtype", type=str, default="float32", help="float32, bfloat16 or auto (bf16 where it is fast)")
    cmds.add_subcommand("eval", p, help="evaluate loss and perplexity")

    p = sub_parser("Solve a classification task by prompting (zero-shot or few-shot): the label whose text the model "
                   "finds most likely. The data is split as `lmforge finetune classify` splits it with the same seed.")
    p.add_argument("run", type=str, help=MODEL_HELP)
    p.add_argument("--data", type=str, required=True, help="CSV, TSV, JSON or JSONL with a text and a label column")
    p.add_argument("--text_column", type=str, default="text", help="a name, or a number from 0 (no header)")
    p.add_argument("--label_column", type=str, default="label", help="a name, or a number from 0 (no header)")
    p.add_argument("--shots", type=int, default=0, help="examples from the training split shown before each text")
    p.add_argument("--balance", type=bool, default=False, help="down-sample every class to the smallest one's size")
    p.add_argument("--split", type=tuple[float, float, float], default=(0.7, 0.1, 0.2), help="train/val/test fractions")
    p.add_argument("--seed", type=int, default=123, help="seed of the split and of the examples drawn")
    p.add_argument("--limit", type=int | None, default=None, help="use only this many records before splitting")
    p.add_argument("--test_limit", type=int | None, default=None, help="score only this many test texts")
    p.add_argument("--chat", type=bool, default=False, help="wrap the prompt in the model's chat template")
    p.add_argument("--out", type=str | None, default=None, help="write the results JSON here")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing --out that this command "
                   "did not write")
    cmds.add_subcommand("eval-prompt", p, help="`lmforge eval prompt`: zero-shot / few-shot classification")

    p = sub_parser("Score instruction responses 0-100 with a judge model (the book's prompt): an OpenAI-compatible "
                   "endpoint (--url, --judge_model) or a local model (--judge).")
    p.add_argument("responses", type=str, help="responses.json of `lmforge finetune instruct`")
    p.add_argument("--url", type=str | None, default=None, help="e.g. http://localhost:11434/v1 (Ollama)")
    p.add_argument("--judge_model", type=str, default="llama3", help="the model name the endpoint serves")
    p.add_argument("--judge", type=str | None, default=None, help="a local judge instead: " + MODEL_HELP)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one answer")
    p.add_argument("--retries", type=int, default=3, help="tries again after a failed request")
    p.add_argument("--out", type=str | None, default=None, help="write the scores JSON here")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing --out that this command "
                   "did not write")
    cmds.add_subcommand("eval-judge", p, help="`lmforge eval judge`: score responses with a judge model")

    def choice_flags(p: ArgumentParser) -> None:  # eval choice and eval suite score tasks alike
        p.add_argument("--shots", type=int, default=0, help="solved items shown before each context (k-shot)")
        p.add_argument("--seed", type=int, default=1234, help="seed of the k-shot examples drawn")
        p.add_argument("--batch_size", type=int, default=16, help="choices scored together")
        p.add_argument("--dtype", type=str, default="float32", help="float32, bfloat16 or auto (bf16 where it is "
                       "fast)")
        p.add_argument("--limit", type=int | None, default=None, help="score only the first N items of each task")
        p.add_argument("--overwrite", type=bool, default=False, help=OVERWRITE_HELP)

    p = sub_parser("Multiple choice by log-likelihood, as lm-evaluation-harness scores it: each choice's summed "
                   "log-probability after the context; acc (the best sum) and acc_norm (the best per character). "
                   "Task files: HellaSwag JSONL, BIG-bench task.json, or JSONL {context, choices, label}.")
    p.add_argument("run", type=str, help=MODEL_HELP)
    p.add_argument("--task", type=str, required=True, help="the task file")
    choice_flags(p)
    p.add_argument("--out", type=str | None, default=None, help="write the results JSON here")
    cmds.add_subcommand("eval-choice", p, help="`lmforge eval choice`: multiple choice by log-likelihood")

    p = sub_parser("Several models on several multiple-choice tasks (and bits per byte on --text): one table, "
                   "printed in Markdown and written as suite.md and suite.json into --out.")
    p.add_argument("models", type=str, nargs="+", help="models: " + MODEL_HELP)
    p.add_argument("--tasks", type=str, nargs="+", required=True, help="task files (as for `lmforge eval choice`)")
    p.add_argument("--text", type=str, nargs="+", default=None, help="text files to score in bits per byte")
    p.add_argument("--out", type=str, required=True, help="folder for suite.md and suite.json")
    choice_flags(p)
    cmds.add_subcommand("eval-suite", p, help="`lmforge eval suite`: models x tasks, one table")

    p = sub_parser("Write a model for the rest of the ecosystem: Hugging Face folder or GGUF file.")
    p.add_argument("run", type=str, help=MODEL_HELP)
    p.add_argument("--to", type=str, default="hf", help="'hf' (config.json + model.safetensors + tokenizer) or 'gguf'")
    p.add_argument("--out", type=str, required=True, help="output folder (hf) or .gguf file")
    p.add_argument("--dtype", type=str | None, default=None,
                   help=f"GGUF matrix type: {', '.join(GGUF_EXPORT_TYPES)} (default f16; norms stay f32); "
                        "a Hugging Face export is float32")
    p.add_argument("--overwrite", type=bool, default=False, help=OVERWRITE_HELP + " (never a run directory)")
    cmds.add_subcommand("export", p, help="export to Hugging Face or GGUF")

    p = sub_parser("Write a run's report: one self-contained HTML page (loss curves, learning rate, throughput and "
                   "MFU, gradient norm, evaluations, samples, config, hardware, timings; a fine-tuning run's own "
                   "panels), viewable offline, with its plots as PNG files in a folder beside it.")
    p.add_argument("run", type=str, help="a run directory of `lmforge pretrain` or `lmforge finetune`")
    p.add_argument("--out", type=str | None, default=None, help="the HTML file (default: RUN/report.html)")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing --out that is not an "
                   "lmforge report (never a file of the run itself)")
    cmds.add_subcommand("report", p, help="the HTML report of a run")

    p = sub_parser("Fetch a known model or data set into the cache (sources tried in order, checksums verified).")
    p.add_argument("name", type=str | None, nargs="?", default=None, help="a known name; without one, list them")
    cmds.add_subcommand("download", p, help="fetch known models and data sets")
    return root


def _given(ns) -> dict:
    """The options of a group that were given explicitly (on the command line or in a --config file)."""
    return {k: v for k, v in vars(ns).items() if not k.startswith("__")} if ns else {}


def _model_overrides(p) -> None:
    """--model.* flags whose default is 'the preset's value' (null), so that --help, --print_config
    and a YAML file printed by it describe the run that will be trained, not the dataclass defaults
    (which are GPT-2 124M's)."""
    p.add_class_arguments(ModelConfig, "model")
    p.set_defaults({f"model.{f.name}": None for f in dataclasses.fields(ModelConfig)})
    for action in p._actions:
        if action.dest.startswith("model."):
            # For n_kv_head and d_ff, None has a meaning inside a preset; on the command line null keeps the preset's.
            text = (action.help or "").replace("; None means", "; in a preset, None means")
            action.help = f"{text} Null: the preset's value."
            if action.dest == "model.logit_softcap":
                action.help += " 0: no cap (turns a recipe's cap off)."
    group = getattr(p, "groups", {}).get("model")
    if group is not None:
        group.description = ("The model's shape: the --preset's values, changed by any --model.* given "
                             "(default null = keep the preset's value).")


def _config(cls, ns):
    return cls(**_given(ns))


def _run(argv: list[str]) -> int:
    from . import pipeline

    if argv[:2] == ["eval", "harness"]:  # lm-evaluation-harness' own command line, model `lmforge` registered
        try:
            from .lm_eval_bridge import main as harness_main
        except ImportError as e:
            raise LmforgeError(f"`lmforge eval harness` needs lm-evaluation-harness ({e}); "
                               "pip install 'lmforge[eval]'") from None
        _check_harness_output(argv[2:])
        try:
            harness_main(argv[2:])
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except (LmforgeError, OSError, KeyboardInterrupt):
            raise
        except Exception as e:  # the harness' own refusals (an unknown task, a bad option): one line
            raise LmforgeError(f"lm-evaluation-harness: {type(e).__name__}: {e}") from None
        return 0
    if len(argv) > 1 and argv[0] == "eval" and argv[1] in ("prompt", "judge", "choice", "suite"):
        argv = [f"eval-{argv[1]}", *argv[2:]]  # `lmforge eval prompt|judge|choice|suite`: commands of their own
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS + EVAL_COMMANDS:
        raise LmforgeError(f"unknown command {argv[0]!r}; known commands: {', '.join(COMMANDS)} "
                           "(see `lmforge --help`)")
    if not argv or argv[0] not in COMMANDS + EVAL_COMMANDS + ("-h", "--help"):
        argv = ["run", *argv]
    root = _parser()
    try:
        cfg = root.parse_args(argv)
    except UnicodeDecodeError as e:  # jsonargparse reading a --config file that is not text
        raise LmforgeError(f"a --config file is not UTF-8 text ({e.reason} at byte {e.start}); give a YAML "
                           "file") from None
    cmd = cfg.command
    a = cfg[cmd]
    # only what was given (a resumed run keeps its own settings for the rest)
    given = root.parse_args(argv, defaults=False)[cmd] if cmd in ("pretrain", "finetune") else None
    if cmd == "pretrain" and a.resume and given.get("recipe"):
        raise LmforgeError("--recipe sets up a new run; a resumed run keeps the settings it was trained with "
                           "(drop --recipe, or change one setting with its --model.* / --train.* flag)")
    if cmd in ("pretrain", "finetune"):
        from . import distributed

        launch = a if cmd == "pretrain" else a[a.task]
        if not distributed.launched():
            distributed.check_launch(launch.devices, launch.nnodes, launch.node_rank, launch.rdzv_endpoint)
        world = (launch.devices or 1) * launch.nnodes
        if world > 1 and not distributed.launched():
            if not launch.resume:  # checked here, before any process starts (a resumed run's batch is its own)
                train = _fresh_pretrain_configs(given, a)[1] if cmd == "pretrain" else _config(TrainConfig, launch.train)
                distributed.check_batch(train, distributed.Group(world_size=world))
            # The same command line again, in every process torchrun starts (they see that they were launched).
            return distributed.launch(argv, launch.devices or 1, launch.nnodes, launch.node_rank, launch.rdzv_endpoint)
    if cmd == "run":
        pipeline.main_job(a.data, a.out, a.steps, a.max_minutes, a.vocab_size, a.preset, fourway_limit=a.fourway_limit,
                          recipe=a.recipe)
    elif cmd == "tokenizer":
        _tokenizer(a)
    elif cmd == "prepare":
        pipeline.prepare_shards(a.data, a.tokenizer, a.out, _config(DataConfig, a.text), force=a.force,
                                overwrite=a.overwrite)
    elif cmd == "pretrain":
        data = a.data
        if a.resume:  # the run's own settings, changed only where a flag is given
            data_path, model_config, train_config = pipeline.resume_configs(
                a.out, _model_flags(given), _given(given.get("train")), given.get("preset"))
            data = data or data_path
        else:
            model_config, train_config = _fresh_pretrain_configs(given, a)
        if not data:
            raise LmforgeError("--data is required: the directory written by `lmforge prepare`")
        if a.resume and not a.data and not (Path(data) / "index.json").is_file():
            raise LmforgeError(f"the data this run was trained on ({data}, recorded in its config) is gone or moved; "
                               "give its new place with --data")
        summary = pipeline.pretrain(data, a.out, model_config, train_config, resume=a.resume,
                                    prompts=tuple(a.prompts), allow_changes=a.allow_changes, overwrite=a.overwrite)
        _print_summary(summary)
    elif cmd == "finetune":
        _finetune(a, given)
    elif cmd == "classify":
        _classify(a)
    elif cmd == "merge-lora":
        from .finetune import merge_run

        print(f"wrote {merge_run(a.run, a.out)}")
    elif cmd == "generate":
        _generate(a)
    elif cmd == "chat":
        from .chat import Assistant, run_terminal
        from .precision import default_device

        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        with contextlib.suppress(AttributeError, ValueError):  # a stray byte reaches the chat loop, which
            sys.stdin.reconfigure(errors="surrogateescape")   # names it, in every locale (strict lost the line)
        run_terminal(Assistant.load(a.run, default_device(), a.template, a.dtype, a.compile, a.quantize),
                     _config(SampleConfig, a.sample), a.system)
    elif cmd == "serve":
        from .serve import serve

        serve(a.run, a.host, a.port, a.api_key, a.max_batch, a.template, dtype=a.dtype, compile=a.compile,
              quantize=a.quantize, request_timeout=a.request_timeout)
    elif cmd == "eval":
        if a.text:
            res = pipeline.evaluate_text(a.run, a.text, a.dtype)
            print(f"bits per byte {res['bits_per_byte']:.4f}  ({res['tokens']:,} tokens, {res['bytes']:,} bytes)")
        elif a.data:
            res = pipeline.evaluate_run(a.run, a.data, a.split, a.batch_size, a.max_batches, a.context, a.dtype)
            print(f"{res['split']} loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  "
                  f"({res['tokens']:,} tokens)")
        else:
            raise LmforgeError("give --data (a prepared shard set) or --text (text files)")
    elif cmd == "eval-prompt":
        from .prompting import evaluate_prompting

        _check_json_out(a, "eval-prompt", [a.run, a.data])  # before the work: a refusal costs nothing
        res = evaluate_prompting(a.run, a.data, a.text_column, a.label_column, a.shots, a.balance, tuple(a.split),
                                 a.seed, a.limit, a.test_limit, a.chat)
        fix = "give fewer --shots" if a.shots else "the texts are longer than the model's context"
        cut = (f", {res['truncated']} prompts cut to the model's {res['context_length']} tokens, their start lost: "
               f"{fix}") if res["truncated"] else ""
        print(f"{a.shots}-shot test accuracy {res['test']['accuracy']:.4f} ({res['test']['n']} texts, "
              f"{res['seconds'] / 60:.1f} min{cut})")
        _write_json(a.out, res, "eval-prompt")
    elif cmd == "eval-judge":
        from .judge import http_judge, judge_responses, local_judge

        if (a.url is None) == (a.judge is None):
            raise LmforgeError("give either --url (an OpenAI-compatible endpoint) or --judge (a local model)")
        if a.retries < 0 or not 0 < a.timeout <= 86400:  # (a socket's time-out overflows near 1e300 s)
            raise LmforgeError(f"--retries must be >= 0 and --timeout between 0 and 86400 seconds; got --retries "
                               f"{a.retries} --timeout {a.timeout}")
        _check_json_out(a, "eval-judge", [a.responses] + ([a.judge] if a.judge else []))
        ask = http_judge(a.url, a.judge_model, a.timeout, a.retries, os.environ.get("OPENAI_API_KEY")) if a.url \
            else local_judge(a.judge)
        res = judge_responses(a.responses, ask)
        mean = "none could be read" if res["mean"] is None else f"{res['mean']:.2f}"
        long = (f"; {res['too_long']} not scored, their prompt longer than the judge's context: judge with a "
                "model of a longer context") if res["too_long"] else ""
        print(f"judge score (0-100): {mean} over {res['scored']} of {res['n']} responses{long}")
        _write_json(a.out, res, "eval-judge")
    elif cmd == "eval-choice":
        from .choice_eval import run_choice_eval

        run_choice_eval(a.run, a.task, a.shots, a.seed, a.batch_size, a.dtype, a.limit, a.out, a.overwrite)
    elif cmd == "eval-suite":
        from .choice_eval import run_suite

        run_suite(a.models, a.tasks, a.text, a.out, a.shots, a.seed, a.batch_size, a.dtype, a.limit, a.overwrite)
    elif cmd == "export":
        print(f"wrote {pipeline.export(a.run, a.to, a.out, a.dtype, overwrite=a.overwrite)}")
    elif cmd == "download":
        _download(a.name)
    elif cmd == "report":
        from .report import write_report

        out = write_report(a.run, a.out, a.overwrite)
        print(f"wrote {out} (plots in {out.with_name(out.stem + '-plots')})")
    return 0


def _finetune(a, given) -> None:
    from . import distributed

    try:
        _finetune_task(a, given)
    finally:
        distributed.close()  # under torchrun: the job's process group, joined by the task


# The options of each fine-tuning task that its run config records (under these keys), beside the
# finetune / train / lora groups: what a resumed run takes from its config unless given again.
_TASK_SETTINGS = {"classify": ("text_column", "label_column", "balance", "pad_to"),
                  "instruct": ("template", "mask_prompt", "respond_test", "max_new_tokens"),
                  "dpo": ("template", "beta")}


def _stored_task_setting(stored: dict, name: str):
    if name in ("text_column", "label_column"):
        return stored.get("columns", {}).get(name.removesuffix("_column"))
    return stored.get(name)


def _finetune_settings(a, given) -> tuple[dict, dict]:
    """The finetune / train / lora configs and the task's own options of a fine-tuning command. A
    resumed run takes every setting from its own config except the ones given again, as pretraining
    does; a setting given again that differs is then what the resume check reports."""
    from .checkpoint import read_run_config
    from .config import restored
    from .lora import targets_of

    o, g = a[a.task], (given or {}).get(a.task) or {}
    # A --config file printed by --print_config names every setting: only values other than the
    # defaults count as asked for.
    if _given(g.get("train")).get("max_steps", TrainConfig.max_steps) != TrainConfig.max_steps:
        raise LmforgeError("fine-tuning runs for --finetune.epochs epochs and sets the step count from them; "
                           "give --finetune.epochs instead of --train.max_steps")
    configs = dict(finetune=_config(FinetuneConfig, o.finetune), train=_config(TrainConfig, o.train),
                   lora=_config(LoRAConfig, o.lora))
    options = {name: o[name] for name in _TASK_SETTINGS[a.task]}
    stored = None
    if o.resume:
        try:
            stored = read_run_config(o.out)
        except LmforgeError:
            stored = None  # no run to resume: fit says so
    if stored is not None and stored.get("task") != a.task and (o.base is None or o.data is None):
        raise LmforgeError(f"{o.out} holds a run of another task ({stored.get('task', 'pretrain')}), not of "
                           f"`finetune {a.task}`; resume it with its own command, or give another --out")
    options["base"], options["data"] = _finetune_inputs(o, stored if stored and stored.get("task") == a.task else None)
    if stored is not None and stored.get("task") == a.task:
        def keep(cls, name: str, stored_values: dict) -> object:
            return restored(cls, stored_values, _given(g.get(name)), o.out)
        configs["finetune"] = keep(FinetuneConfig, "finetune", stored.get("finetune") or {})
        configs["train"] = keep(TrainConfig, "train", stored.get("train") or {})
        lora = stored.get("lora")
        if lora:  # recorded as the layers it adapts: their kinds are the targets
            configs["lora"] = keep(LoRAConfig, "lora", {"rank": lora.get("rank"), "alpha": lora.get("alpha"),
                                                        "dropout": lora.get("dropout"),
                                                        "targets": targets_of(lora.get("layers", []))})
        for name in _TASK_SETTINGS[a.task]:
            value = _stored_task_setting(stored, name)
            if name not in g and value is not None:
                options[name] = value
    lora_asked = {k: v for k, v in _given(g.get("lora")).items()
                  if (tuple(v) if isinstance(v, list) else v) != getattr(LoRAConfig(), k, v)}
    if configs["finetune"].trainable != "lora" and lora_asked:
        raise LmforgeError(f"--lora.* settings were given, but --finetune.trainable is "
                           f"{configs['finetune'].trainable!r}, which adds no adapters; add --finetune.trainable lora")
    return configs, options


def _finetune_inputs(o, stored: dict | None) -> tuple[str, str]:
    """--base and --data of a fine-tuning command; a resumed run's own (recorded in its config) where
    not given again."""
    base, data = o.base, o.data
    if stored is not None:
        spec = (stored.get("base") or {}).get("spec") if isinstance(stored.get("base"), dict) else None
        if base is None and isinstance(spec, str):
            if Path(spec).is_absolute() and not Path(spec).exists():
                raise LmforgeError(f"the base model this run started from ({spec}, recorded in its config) is gone "
                                   "or moved; give its new place with --base")
            base = spec
        recorded = stored.get("data_path")
        if data is None and isinstance(recorded, str):
            if not Path(recorded).is_file():
                raise LmforgeError(f"the data this run was trained on ({recorded}, recorded in its config) is gone "
                                   "or moved; give its new place with --data")
            data = recorded
    missing = [what for what, value in (("--base (the model to start from)", base), ("--data (the data file)", data))
               if value is None]
    if missing:
        where = f"; {o.out} holds no run of this task to take them from" if o.resume else ""
        raise LmforgeError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required{where}")
    return base, data


def _finetune_task(a, given) -> None:
    from . import finetune

    task = a.task
    o = a[task]
    configs, options = _finetune_settings(a, given)
    common = dict(**configs, resume=o.resume, overwrite=o.overwrite, allow_changes=o.allow_changes)
    if task == "classify":
        res = finetune.finetune_classify(options.pop("base"), options.pop("data"), o.out, **options, **common)
        for split in ("val", "test"):
            if split in res:
                print(f"{split} accuracy {res[split]['accuracy']:.4f} ({res[split]['n']} texts), "
                      f"macro F1 {res[split]['macro_f1']:.4f}")
    elif task == "instruct":
        res = finetune.finetune_instruct(options.pop("base"), options.pop("data"), o.out, **options, **common)
        for when in ("before", "after"):
            r = res.get(when)
            if r:
                val = r["val"].get("loss")
                shown = "none (no validation records)" if val is None else f"{val:.4f}"
                print(f"{when}: val loss {shown}" + (f", test ROUGE-L {r['rouge_l']:.4f}" if "rouge_l" in r else ""))
    else:
        res = finetune.finetune_dpo(options.pop("base"), options.pop("data"), o.out, **options, **common)
        for when in ("before", "after"):
            r = res.get(when)
            if r and "loss" in r:  # nothing to report without validation pairs
                print(f"{when}: val loss {r['loss']:.4f}, reward margin {r['reward_margin']:.4f} (chosen "
                      f"{r['chosen_reward']:.4f}, rejected {r['rejected_reward']:.4f})")
    print(f"results: {Path(o.out) / finetune.RESULTS}")


def _classify(a) -> None:
    from .finetune import classify_texts

    texts = list(a.texts)
    if a.file:
        path = Path(a.file)
        if not path.is_file():
            raise LmforgeError(f"--file {path} is a folder; give a text file with one text per line" if path.is_dir()
                               else f"no file at {path}")
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise LmforgeError(f"{path} is not UTF-8 text") from None
        if not lines:  # not a reason to read standard input instead
            raise LmforgeError(f"{path} holds no text to classify (one text per line)")
        texts += lines
    if not texts:
        texts = [ln for ln in _utf8(sys.stdin.buffer.read(), "the text to classify").removeprefix("\ufeff")
                 .splitlines() if ln.strip()]
    if not texts:
        raise LmforgeError("no texts to classify: give them as arguments, with --file, or on standard input")
    for text, (label, p, _) in zip(texts, classify_texts(a.run, texts)):
        print(f"{label}\t{p:.4f}\t{one_line(text)[:200]}")


def _json_format(cmd: str) -> str:
    return f"lmforge-{cmd}"  # the "format" a results JSON of `lmforge <cmd>` starts with


def _check_harness_output(args: list[str]) -> None:
    """lm-evaluation-harness' --output_path, checked as lmforge checks its own outputs: the harness
    writes into whatever it is given (a training run, a data folder) and, given a file, logs the
    failure and exits 0 with nothing saved. It writes FOLDER/MODEL/results_TIME.json, or
    NAME_TIME.json beside a path ending in .json: never over an existing file."""
    out = next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--output_path", "-o")),
               next((arg.split("=", 1)[1] for arg in args if arg.startswith("--output_path=")), None))
    if not out:
        return
    from .data import is_shard_dir
    from .outputs import check_output

    json_file = Path(out).suffix == ".json"
    check_output(out, kind="file" if json_file else "folder", what="a folder of results",
                 own_kind=lambda p: json_file or (p.is_dir() and not is_shard_dir(p)), flag="--output_path")


def _check_json_out(a, cmd: str, inputs: list[str]) -> None:
    """Refuse --out before any work if writing it could destroy an input, a run's files or a file
    this command did not write (unless --overwrite)."""
    if a.out:
        from .outputs import check_output, read_json_head

        # Its results before they carried a "format" are recognised by their fields.
        fields = {"eval-prompt": {"test", "shots"}, "eval-judge": {"scores", "mean"}}[cmd]

        def own(p: Path) -> bool:
            head = read_json_head(p) or {}
            return head.get("format") == _json_format(cmd) or ("format" not in head and fields <= set(head))

        check_output(a.out, kind="file", what=f"a results file of `lmforge {cmd.replace('-', ' ')}`", own_kind=own,
                     inputs=inputs, overwrite=a.overwrite)


def _write_json(out: str | None, res: dict, cmd: str) -> None:
    if out:
        from . import atomic

        print(f"wrote {atomic.write_json(Path(out), {'format': _json_format(cmd), **res})}")


def _download(name: str | None) -> None:
    from . import hub

    if name is None:
        for entry in hub.REGISTRY.values():
            print(f"{entry.name:<34} {entry.kind:<8} {entry.description}")
        return
    path = hub.fetch(name)
    print(path)


def _print_summary(s: dict) -> None:
    line = f"finished {s['steps']} steps ({s['tokens']:,} tokens, {s['seconds'] / 60:.1f} min): train loss {s['train_loss']:.4f}"
    if "val_loss" in s:
        line += f", val loss {s['val_loss']:.4f}, perplexity {s['val_perplexity']:.2f}"
    print(line)
    print(f"run directory: {s['run']}")


def _tokenizer(a) -> None:
    from . import pipeline
    from .tokenizer import Tokenizer

    if a.action == "train":
        pipeline.train_tokenizer(a.train.data, a.train.out, _config(TokenizerConfig, a.train.tokenizer),
                                 _config(DataConfig, a.train.text), overwrite=a.train.overwrite)
    elif a.action == "encode":
        tok = Tokenizer.load(a.encode.tokenizer)
        text = a.encode.text if a.encode.text is not None else _utf8(sys.stdin.buffer.read(), "the text")
        try:
            ids = tok.encode(text, allowed_special="all" if a.encode.allow_special else ())
        except LmforgeError as e:
            if "contains the special token" not in str(e):
                raise
            raise LmforgeError(str(e).split(";")[0] + "; pass --allow_special true to encode it as its id") from None
        print(" ".join(map(str, ids)))
    else:
        tok = Tokenizer.load(a.decode.tokenizer)
        raw = a.decode.ids if a.decode.ids is not None else _utf8(sys.stdin.buffer.read(), "the ids")
        import re

        items = re.split(r"\s*,\s*|\s+", raw.strip()) if raw.strip() else []
        if "" in items:  # "1,,2" or "1,2,": an id left out, not a separator to skip
            raise LmforgeError("--ids has an empty item between commas; give integers separated by spaces or commas")
        try:
            ids = [int(x) for x in items]
        except ValueError:
            raise LmforgeError("--ids must be integers separated by spaces or commas") from None
        sys.stdout.write(tok.decode(ids) + "\n")


def _generate(a) -> None:
    from .generate import stream_text
    from .models import load_language_model
    from .precision import default_device

    from .precision import resolve_dtype

    device = default_device()
    model, tok = load_language_model(a.run, device)
    model.to(resolve_dtype(a.dtype, device))
    if a.quantize:
        from .quantize import quantize_model

        quantize_model(model, a.quantize)
    cfg = _config(SampleConfig, a.sample)
    prompt = a.prompt if a.prompt is not None else _stdin_prompt()
    text = prompt
    if a.chat:  # the answer to a message; it ends where the template starts the next turn
        text, stop = _chat_prompt_ids(tok, prompt, a.run)
        if len(text) >= model.config.context_length:  # a slid window would lose the template's opening
            raise LmforgeError(f"the prompt is {len(text)} tokens with its template; the model's context is "
                               f"{model.config.context_length}: write a shorter one (as `lmforge chat` asks)")
        cfg = dataclasses.replace(cfg, stop=tuple(cfg.stop) + stop)
    sys.stdout.write(prompt if not a.chat else "")
    for delta in stream_text(model, tok, text, cfg, compile=a.compile):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _stdin_prompt() -> str:
    """The prompt from standard input (`echo "Once upon" | lmforge generate gpt2`); with none (a
    terminal, or no standard input at all) the empty prompt, which starts a new document."""
    import io

    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return ""
    if os.isatty(fd):
        return ""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return _utf8(b"".join(chunks), "the prompt").rstrip("\n")


def _utf8(raw: bytes, what: str) -> str:
    """Bytes read from standard input as UTF-8 text, strictly (as files are read): stray bytes are an
    error, not replacement characters passed on silently."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{what} on standard input is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def _chat_prompt_ids(tok, prompt: str, source: str) -> tuple[list[int], tuple[str, ...]]:
    """The ids of ``prompt`` as the user's message in the template the model answers in (the one it
    was tuned on, else its chat template; as in `lmforge chat` and on the server), and the template's
    stop strings."""
    from .chat import answer_template, stop_strings, user_prompt_ids
    from .tokenizer import ChatTemplateError

    template = answer_template(source, tok)
    if template is None:
        raise LmforgeError(f"{source} has no chat template and was not instruction-tuned; leave out --chat")
    try:
        return user_prompt_ids(tok, template, prompt), stop_strings(template)
    except ChatTemplateError as e:  # a template from a foreign file: broken, or stopped by the sandbox
        raise e.for_command(source, "run without --chat true") from None


def _silence_stdout() -> None:
    """After a closed pipe (`lmforge generate ... | head`), point stdout at /dev/null so that the
    interpreter's final flush cannot raise a second BrokenPipeError on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (tests capture it): nothing will be flushed to a pipe


def _model_flags(given) -> dict:
    """The --model.* flags typed on the pretrain command line (null: the preset's value). A soft cap
    of 0 means none: the way to turn a recipe's cap off, since null keeps it."""
    flags = {k: v for k, v in _given(given.get("model")).items() if v is not None}
    if flags.get("logit_softcap") == 0:
        flags["logit_softcap"] = None
    return flags


def _fresh_pretrain_configs(given, a) -> tuple[ModelConfig, TrainConfig]:
    """The model and train configs of a new pretraining run from the options given (``given``): the
    recipe's settings (when one is named), then those flags; else the preset and the train flags."""
    if a.recipe:
        return recipe_configs(a.recipe, a.preset, **_model_flags(given), **_given(given.get("train")))
    return ModelConfig.from_preset(a.preset, **_model_flags(given)), _config(TrainConfig, a.train)


_python_format_warning = warnings.formatwarning


def format_warning(message, category, filename, lineno, line=None) -> str:
    """lmforge's own warnings as one line, like its errors (Python's format adds the file, the line
    number and the source line); other libraries' warnings as Python writes them."""
    if f"{os.sep}lmforge{os.sep}" in str(filename):
        return f"lmforge: warning: {one_line(str(message))}\n"
    return _python_format_warning(message, category, filename, lineno, line)


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """While a command runs, SIGTERM raises ``Terminated`` instead of ending the process at once, so a
    kill leaves no temporary files or half-made folders behind. Not under torchrun, which ends its
    workers with SIGTERM when one fails: there they stop at once, as before."""
    from . import distributed

    if threading.current_thread() is not threading.main_thread() or distributed.launched():
        yield
        return

    def terminated(signum, frame):
        raise Terminated()

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false",
               "NoneType": "null"}


def _flag_error(text: str) -> str:
    """jsonargparse's account of a flag value of the wrong type, in words: "--devices must be a whole
    number or null, got 1.5", not 'Parser key "devices": Does not validate against any of the Union
    subtypes Subtypes: [<class 'int'>, <class 'NoneType'>] Errors: ...'. Other messages pass as they are."""
    import re

    required = re.match(r"the following arguments are required: (.*)$", text)
    if required:  # "prepare.data, prepare.out" / "finetune.classify.base": the flags as typed
        names = [key.strip().rsplit(".", 1)[-1] for key in required.group(1).split(",")]
        flags = [_POSITIONAL.get(n) or f"--{n}" for n in names]
        return f"{' and '.join(flags) if len(flags) == 2 else ', '.join(flags)} " \
               f"{'is' if len(flags) == 1 else 'are'} required"
    choice = re.match(r'expected "[\w.-]+" to be one of \{([^}]*)\}, but it was not provided', text)
    if choice:  # `lmforge finetune` alone
        return f"give one of {', '.join(choice.group(1).split(','))}"
    flag = re.match(r'Parser key "([^"]+)": ', text)
    value = re.search(r"(?:Given value|Got value): (.*?)\.?$", text)
    if not (flag and value):
        return text
    union = re.search(r"Subtypes: \[([^\]]*)\]", text)
    single = re.search(r"Expected a (<class '\w+'>|typing\.Literal\[[^\]]*\])\. Got value", text)
    names = re.findall(r"<class '(\w+)'>", union.group(1)) if union else \
        re.findall(r"<class '(\w+)'>", single.group(1)) if single else []
    if names == ["tuple"] or names == ["list"]:  # --finetune.split and the like: a JSON list
        kinds = "a list in brackets, such as [0.8,0.1,0.1]"
    elif single and not names:  # a choice of values
        kinds = "one of " + ", ".join(re.findall(r"'([^']*)'", single.group(1)))
    elif names and all(n in _TYPE_WORDS for n in names):
        kinds = " or ".join(_TYPE_WORDS[n] for n in names)
    else:
        return text
    return f"--{flag.group(1)} must be {kinds}, got {value.group(1)}"


def main(argv: list[str] | None = None) -> int:
    from .outputs import fs_hint

    warnings.formatwarning = format_warning
    argv = sys.argv[1:] if argv is None else argv
    try:
        with _terminate_as_exception():
            return _run(list(argv))
    except LmforgeError as e:
        print(f"lmforge: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as e:
        where = "lmforge --help"
        if argv and argv[0] in COMMANDS:  # the subcommand's own help where one was named (finetune classify)
            where = f"lmforge {argv[0]} {argv[1]} --help" if argv[0] in _GROUPS and len(argv) > 1 \
                and argv[1] in _GROUPS[argv[0]] else f"lmforge {argv[0]} --help"
        print(f"lmforge: error: {_flag_error(one_line(str(e))).rstrip('.')}. See `{where}`.", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()  # the reader went away (| head): stop quietly, as other command-line tools do
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe
    except OSError as e:  # a full disk, a read-only folder, a file where a folder should be, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"lmforge: error: {e.strerror or one_line(str(e))}{where} ({fs_hint(e)})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("lmforge: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    except Exception as e:  # a bug, or an interrupt that struck inside an import: one line, traceback on request
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: internal error: {type(e).__name__}: {one_line(str(e))[:300]} (a bug in lmforge: "
              "please report it; LMFORGE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

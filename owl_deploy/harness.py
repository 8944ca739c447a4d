"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, offline, on tasks built from the packaged texts.

``lambada_wiki`` is LAMBADA's protocol on the evaluation text: each paragraph of ``wiki`` (40 to 200 words)
with its last word (letters only, 3+ characters) as the target; accuracy is the share of targets the model
predicts greedily in full, reported with the harness's standard error. The task file is written once under
``$OWL_DEPLOY_HOME/tasks`` (deterministic: the same text gives the same items) and the harness reads it as a
local JSON dataset, so nothing is fetched.

A torch model runs through the harness's own ``HFLM``; a deployment folder (ONNX) through
:class:`DeploymentLM`, which scores continuations with the engine's logits, so an int8 export is measured as
it deploys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from owl_deploy.errors import OwlError

TASKS = ("lambada_wiki",)
_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[.!?,;:\"')\]]*$", re.DOTALL)


def lambada_items(text: str, limit: int | None = None) -> list[dict[str, str]]:
    """(context, target) of every paragraph of 40-200 words ending in a plain word, in text order."""
    items = []
    for para in text.split("\n"):
        words = para.split()
        if not 40 <= len(words) <= 200:
            continue
        m = _WORD.match(para.strip())
        if m:
            items.append({"context": m.group(1), "target": m.group(2)})
            if limit is not None and len(items) >= limit:
                break
    return items


def task_dir(name: str = "lambada_wiki", text: str = "wiki") -> Path:
    """A folder with the task's YAML and its JSONL data (under $OWL_DEPLOY_HOME/tasks; made once)."""
    from owl_deploy import assets
    from owl_deploy.data import load_text
    from owl_deploy.io import atomic_file

    if name not in TASKS:
        raise OwlError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    raw = load_text(text)
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    folder = assets.home() / "tasks" / f"{name}-{digest}"
    data = folder / f"{name}.jsonl"
    if not data.is_file():
        items = lambada_items(raw)
        if not items:
            raise OwlError(f"text {text!r} has no paragraph of 40-200 words ending in a word")
        with atomic_file(data) as fh:
            fh.writelines(json.dumps(item) + "\n" for item in items)
    yaml_text = "\n".join(
        [
            f"task: {name}",
            "dataset_path: json",
            f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}",
            "test_split: test",
            "output_type: loglikelihood",
            'doc_to_text: "{{context}}"',
            'doc_to_target: " {{target}}"',
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
            "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}",
            "",
        ]
    )
    with atomic_file(folder / f"{name}.yaml") as fh:
        fh.write(yaml_text)
    return folder


def deployment_lm(session, tokenizer):
    """An lm-evaluation-harness model over a compiled deployment (runtime.Session): loglikelihoods from the
    engine's own logits, each request from an empty cache, truncated on the left to the sequence length.
    (Defined here, not at import: importing the harness takes seconds.)"""
    from lm_eval.api.model import LM

    class DeploymentLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, continuation = req.args
                ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
                whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
                n_cont = max(1, len(whole) - len(ctx))
                ids = whole[-(session.sequence_length - 1) :]
                session.reset()
                logits = session.forward(ids[:-1])[-n_cont:].astype(np.float64)
                logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
                targets = ids[-n_cont:]
                total = float(sum(logp[i, t] for i, t in enumerate(targets)))
                greedy = all(int(np.argmax(logits[i])) == t for i, t in enumerate(targets))
                out.append((total, greedy))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("rolling loglikelihood is not served by a deployment")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("generation tasks are not served by a deployment")

    return DeploymentLM()


def evaluate_tasks(
    model_spec: str, tasks: list[str], limit: int | None = None, engine: str = "onnxruntime", threads=None
) -> dict:
    """Run ``tasks`` on a torch model or a deployment folder; {task: {acc, acc_stderr, items}}."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from owl_deploy.evaluate import is_deployment

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise OwlError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
    folders = [task_dir(t) for t in tasks]
    with tempfile.TemporaryDirectory(prefix="owl-tasks-") as include:
        for f in folders:
            for yml in f.glob("*.yaml"):
                (Path(include) / yml.name).write_text(yml.read_text())
        if is_deployment(model_spec):
            from owl_deploy import runtime

            dep = runtime.open_deployment(model_spec)
            tokenizer = dep.tokenizer()
            lm = deployment_lm(runtime.compile(dep, engine, threads=threads), tokenizer)
        else:
            from lm_eval.models.huggingface import HFLM

            from owl_deploy.specs import load_model

            model, tokenizer = load_model(model_spec)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress on stdout; --json owns it
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), limit=limit, task_manager=TaskManager(include_path=include),
                log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
            )  # fmt: skip
    out = {}
    for task in tasks:
        r = results["results"][task]
        out[task] = {
            "acc": float(r["acc,none"]),
            "acc_stderr": float(r["acc_stderr,none"]),
            "perplexity": float(r["perplexity,none"]),
            "items": int(results["n-samples"][task]["effective"]),
        }
    return out

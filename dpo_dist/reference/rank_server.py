"""`reference.placement: ranks`: the reference ranks' server loop and the policy ranks' client (the placement
itself, what the stages ask of it, is dpo_dist/reference/ranks.py).

Protocol over the bridge (roles.py), every message a pickled dict, in a fixed order:
1. each reference rank loads the reference (ZeRO-3 inference among the K reference ranks when K > 1), fingerprints it
   (all-reduced among them, 8 bytes a tensor) and sends a hello to each policy rank it serves: fingerprints, config,
   frozen/eval facts, bytes held (or the error that stopped the load);
2. rounds: each of its policy ranks sends one request ({"kind": "forward", "kwargs": ...} or {"kind": "done"}), all
   policy ranks send the same sequence (they run the same steps), so in any round every client of every reference
   rank asks for the same kind of thing. Forward requests of one round with equal sequence length are concatenated
   into one forward (`reference.batch_requests`; with `reference.pad_to_multiple_of` set, micro-batches are padded to
   a multiple, so equal lengths are common), so a reference rank serving P/K policy ranks runs
   fewer forwards than requests; every reference rank runs the same number of forwards a round, which ZeRO-3
   inference among them requires;
3. a "report" round: each reference rank checks its weights did not move and answers with its report rows; a "done"
   round carries the verdict, so every process of the job exits with the same code. Until "done" the reference
   ranks keep serving: a script that trains with the trainer `dpo_dist.api.prepare` returned sends it at exit.
The policy side uses TRL's own hooks: with `precompute_ref_log_probs=True` and no `ref_model` TRL builds no reference;
the trainers below then call a `RemoteReference` module wherever TRL would call its reference.
"""

from __future__ import annotations

import gc
import time
from types import SimpleNamespace
from typing import Any

import torch

from dpo_dist.compat.transformers import outside_zero3
from dpo_dist.config.names import Dtype
from dpo_dist.load import models
from dpo_dist.runtime.roles import IDLE_WAIT, BridgeError, Roles, die
from dpo_dist.verify import model_checks, probes, weights
from dpo_dist.verify.report import RankReport


# -- reference side ---------------------------------------------------------------------------------------------------
def inference_config(dtype: str, hidden: int | None) -> dict[str, Any]:
    """A forward-only ZeRO-3 engine among the reference ranks (no optimizer, nothing persistent beyond small tensors,
    gathered layers released right after use)."""
    zero: dict[str, Any] = {"stage": 3, **probes.forward_only_zero3(hidden)}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "bf16": {"enabled": dtype == Dtype.BFLOAT16}, "fp16": {"enabled": dtype == Dtype.FLOAT16}}


def load_reference(cfg, ctx, path) -> tuple[Any, Any]:
    """(module, callable that runs a forward): whole on the device for K = 1, a ZeRO-3 inference engine for K > 1."""
    from trl.trainer.utils import add_fused_lm_head

    if ctx.world_size == 1:
        with outside_zero3():
            model = models.load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle)
        model.to(ctx.device)
        models.freeze(model)
        add_fused_lm_head(model)
        return model, model
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hidden = models.read_config_json(path).get("hidden_size")
    ds = inference_config(cfg.model.dtype, hidden)
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 - transformers partitions while loading only while this object lives
    model = models.load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle)
    models.freeze(model)
    add_fused_lm_head(model)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return model, engine


def hello_for(model, ctx, roles: Roles, path, rr: RankReport) -> dict[str, Any]:
    fps = weights.model_fingerprints(model, ctx, "fingerprint reference")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    in_train = models.training_modules(model)
    nbytes = weights.local_bytes(model, ctx)
    rr.add("reference rank: frozen and in eval mode", not trainable and not in_train,
           f"{len(trainable)} trainable, {len(in_train)} modules in train mode",
           "the reference on the reference ranks is trainable or in train mode")
    rr.facts[f"rank_{roles.global_rank}_reference_bytes"] = nbytes
    return {"fingerprints": fps, "config": model.config.to_dict(), "trainable": trainable[:3],
            "in_train": in_train[:3], "bytes": nbytes, "path": str(path), "rank": roles.global_rank}


def group_requests(requests: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[tuple[int, int, int]]]]:
    """Requests of equal sequence length concatenated along the batch (one forward each group), with each request's
    (index, first row, end row). Only equal lengths: padding a sequence changes its bf16 results (the attention
    kernel's blocking follows the key length; measured: up to 0.06 in a log-prob on the tiny model), while more rows
    of the same length do not (measured: bitwise equal). So a batched reference stays bitwise the colocated one."""
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        by_len.setdefault(r["kwargs"]["input_ids"].shape[1], []).append(i)
    groups = []
    for idx in by_len.values():
        first = requests[idx[0]]["kwargs"]
        merged = {k: torch.cat([requests[i]["kwargs"][k] for i in idx]) if torch.is_tensor(v) else v
                  for k, v in first.items()}
        spans, start = [], 0
        for i in idx:
            b = requests[i]["kwargs"]["input_ids"].shape[0]
            spans.append((i, start, start + b))
            start += b
        groups.append((merged, spans))
    return groups


class Server:
    """One reference rank: answers its policy ranks' forward requests until they are done."""

    def __init__(self, cfg, ctx, roles: Roles, forward, model):
        self.cfg, self.ctx, self.roles, self.forward, self.model = cfg, ctx, roles, forward, model
        self.clients = roles.clients_of(roles.role_rank)
        self.last_fused: bool | None = None
        # per kind of answer, log_probs (TRL's reference forwards) or logits (the KL checks): rounds, forwards, time
        self.by_kind: dict[str, dict[str, float]] = {}

    def total(self, what: str) -> float:
        return sum(c[what] for c in self.by_kind.values())

    def run_round(self, requests: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """One forward per group of equal-length requests (batch_requests) or per request; with K > 1 every
        reference rank runs the same number of forwards (ZeRO-3 inference gathers each layer from all of them),
        repeating its first one where it has fewer."""
        fused = bool(requests[0]["kwargs"].get("fused_lm_head"))
        if self.ctx.world_size > 1 and self.last_fused is not None and fused != self.last_fused:
            from dpo_dist.compat.deepspeed import reset_zero3_trace

            reset_zero3_trace(self.forward)  # another kind of forward: the ZeRO-3 prefetch trace no longer holds
        self.last_fused = fused
        key = "log_probs" if fused else "logits"
        t0 = time.perf_counter()
        units = group_requests(requests) if self.cfg.reference.batch_requests else \
            [(r["kwargs"], [(i, 0, r["kwargs"]["input_ids"].shape[0])]) for i, r in enumerate(requests)]
        count = len(units)
        if self.ctx.world_size > 1:
            count = int(self.ctx.all_reduce(torch.tensor([count]), "max").item())
        answers: list[dict[str, torch.Tensor]] = [{} for _ in requests]
        with torch.no_grad():
            for j in range(count):
                kwargs, spans = units[j] if j < len(units) else units[0]
                out = getattr(self.forward(**{k: _to(v, self.ctx.device) for k, v in kwargs.items()}), key)
                if j < len(units):
                    for i, a, b in spans:
                        answers[i] = {key: out[a:b]}
        c = self.by_kind.setdefault(key, {"rounds": 0, "forwards": 0, "seconds": 0.0})
        c["rounds"] += 1
        c["forwards"] += count
        c["seconds"] += time.perf_counter() - t0
        return answers

    def serve(self, report) -> bool:
        """Answer rounds until the policy ranks are done; returns their verdict. `report()` gives this rank's report
        rows (a collective among the reference ranks: every one of them gets the report round at the same time)."""
        roles = self.roles
        while True:
            requests = [roles.recv(c, IDLE_WAIT) for c in self.clients]
            kinds = {r.get("kind") for r in requests}
            if len(kinds) != 1:
                raise BridgeError(f"policy ranks {self.clients} out of step: asked for {sorted(map(str, kinds))}")
            if kinds == {"done"}:
                return all(r.get("passed", True) for r in requests)
            answers = [report()] * len(self.clients) if kinds == {"report"} else self.run_round(requests)
            for c, answer in zip(self.clients, answers, strict=True):
                roles.send(answer, c)


def _to(v, device):
    return v.to(device) if torch.is_tensor(v) else v


def serve(cfg, ctx, roles: Roles, debug: bool = False) -> int:
    """The whole life of a reference rank. Returns the job's verdict as an exit code (0 passed)."""
    from dpo_dist.config.resources import resolve_model_path
    from dpo_dist.runtime.faults import inject_fault

    rr = RankReport(roles.global_rank)
    where = roles.describe(roles.global_rank)
    path = resolve_model_path(cfg.reference.path or cfg.model.path)
    try:
        inject_fault("reference load", roles.global_rank)
        t0 = time.perf_counter()
        model, forward = load_reference(cfg, ctx, path)
        hello = hello_for(model, ctx, roles, path, rr)
        hello["load_seconds"] = round(time.perf_counter() - t0, 3)
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        if ctx.world_size > 1:  # inside ZeRO-3 collectives: the other reference ranks cannot be told
            die(f"{where} failed loading the reference: {type(e).__name__}: {e}")
        model = forward = None
        hello = {"error": f"{where} could not load the reference from {path}: {type(e).__name__}: {e}"}
    server = Server(cfg, ctx, roles, forward, model)

    def report() -> RankReport:
        out = RankReport(rr.rank, list(rr.checks), dict(rr.facts))
        if model is not None:
            model_checks.reference_unmoved(hello["fingerprints"], weights.model_fingerprints(model, ctx), out,
                                           " (reference ranks)",
                                           "the reference changed on the reference ranks: it must stay frozen")
        out.facts[f"rank_{roles.global_rank}_served"] = {
            "policy_ranks": server.clients, "rounds": server.total("rounds"), "forwards": server.total("forwards"),
            "busy_seconds": round(server.total("seconds"), 3),
            "by_kind": {k: {n: round(v, 3) for n, v in c.items()} for k, c in server.by_kind.items()}}
        return out

    try:
        for c in server.clients:
            roles.send(hello, c)
        inject_fault("reference serve", roles.global_rank)
        passed = server.serve(report)
    except BridgeError as e:
        die(f"{where}: {e}; stopping (the launcher ends the other ranks)")
    return 0 if passed else 1


# -- policy side ------------------------------------------------------------------------------------------------------
class ReferenceRankLost(BridgeError, ConnectionError):
    """This policy rank's reference rank stopped answering: a named failure of the stage it happened in (exit 1),
    not an unexpected error (issue 21, #57). A ConnectionError, so the stages report it as a known failure."""


def _lost(roles: Roles, server: int, e: BridgeError) -> ReferenceRankLost:
    return ReferenceRankLost(
        f"rank {server} did not answer within sharding.timeout_s ({roles.timeout.total_seconds():g} s) as "
        f"{roles.describe(server)} ({e}): stopped or its node hung, or killed. Fix: see logs/rank{server}.log and "
        "that node; raise sharding.timeout_s only if it was merely slow")


class RemoteReference(torch.nn.Module):
    """Stands where TRL (and our KL checks) call a reference model: sends the inputs to this policy rank's reference
    rank and returns its log-probs (TRL's fused head) or logits, on this rank's device. Holds no weights."""

    runs_on_cpu = False

    def __init__(self, roles: Roles, device: torch.device):
        super().__init__()
        self.roles, self.device = roles, device
        self.server = roles.server_of(roles.global_rank)
        self._hello: dict[str, Any] | None = None
        self._closed = False
        self.calls = 0
        self.wait_s = 0.0  # time spent waiting for answers: what the reference ranks cost a policy step

    def _send(self, obj: dict[str, Any]) -> None:
        try:
            self.roles.send(obj, self.server)
        except ReferenceRankLost:
            raise
        except BridgeError as e:
            raise _lost(self.roles, self.server, e) from None

    def _recv(self) -> Any:
        try:
            return self.roles.recv(self.server)
        except ReferenceRankLost:
            raise
        except BridgeError as e:
            raise _lost(self.roles, self.server, e) from None

    def hello(self) -> dict[str, Any]:
        if self._hello is None:
            self._hello = self._recv()
        return self._hello

    @torch.no_grad()
    def forward(self, **kwargs):
        self.hello()
        t0 = time.perf_counter()
        self._send({"kind": "forward", "kwargs": {k: v for k, v in kwargs.items() if v is not None}})
        answer = self._recv()
        self.wait_s += time.perf_counter() - t0
        self.calls += 1
        return SimpleNamespace(**{k: v.to(self.device) for k, v in answer.items()})

    def reports(self, ctx) -> list[RankReport]:
        """Every reference rank's report rows, on every policy rank (each asks its own reference rank; the policy
        ranks then share what they got), so every rank builds the same report and returns the same exit code."""
        self.hello()
        self._send({"kind": "report"})
        mine = self._recv()
        got = {r.rank: r for r in ctx.gather_objects(mine)}
        return [got[k] for k in sorted(got)]

    def close(self, passed: bool) -> None:
        """This policy rank is done with the reference; its reference rank exits with `passed` as its verdict once
        all of its policy ranks said so. Idempotent."""
        if not self._closed:
            self._closed = True
            self.hello()
            self._send({"kind": "done", "passed": bool(passed)})


def stray_parameter_bytes(keep: list[torch.nn.Module]) -> int:
    """Bytes of every live nn.Parameter in this process that belongs to none of `keep`: a measurement (a scan of the
    garbage collector's objects), not the assumption that no reference was loaded here."""
    owned = {id(p) for m in keep for p in m.parameters()}
    total = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter) and id(obj) not in owned:
            ds_tensor = getattr(obj, "ds_tensor", None)
            total += obj.numel() * obj.element_size()
            total += ds_tensor.numel() * ds_tensor.element_size() if ds_tensor is not None else 0
    return total

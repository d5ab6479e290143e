"""`dpo-dist init`: load, prove, build the DPOTrainer, report. One readable sequence of stages.

After every stage all ranks decide together (an all-reduced flag) whether to go on, so a failure on one rank stops
every rank at the same point and they all reach the report instead of waiting in a collective for the watchdog.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_dist.config.resources import resolve_model_path
from dpo_dist.config.schema import RunConfig, to_dict
from dpo_dist.data.keys import tokenizer_key
from dpo_dist.data.sources import DataError
from dpo_dist.init import loader_choice
from dpo_dist.init.manifest_check import check_manifest
from dpo_dist.init.preflight import check_checkpoint
from dpo_dist.init.state import InitState
from dpo_dist.load import models
from dpo_dist.load.checkpoint import CheckpointError
from dpo_dist.reference.registry import strategy_for
from dpo_dist.runtime import console, liveness
from dpo_dist.runtime.distributed import DistContext
from dpo_dist.runtime.faults import inject_fault
from dpo_dist.runtime.world import world_problem
from dpo_dist.sharding import views
from dpo_dist.sharding.registry import backend_for
from dpo_dist.train import rewind
from dpo_dist.train.trainer import LossRecorder, build_dpo_config, training_fields, use_training_fields
from dpo_dist.verify import lineage, model_checks, probes, tolerances, weight_checks, weights
from dpo_dist.verify.report import RankReport, build_report, failure_line, render_table, timed, write_json_atomic

KNOWN_ERRORS = (CheckpointError, DataError, FileNotFoundError, ValueError, OSError)
# Stages that run collectives inside them (ZeRO-3 loading and gathers, all-reduces, TRL's barriers). The others
# (setup, tokenizer) are local, so a failure there is decided together at the stage's end and lands in the report.
COLLECTIVE_STAGES = ("load", "static proofs", "forward proofs", "trainer", "smoke steps")


@dataclass
class InitResult:
    report: dict[str, Any]
    trainer: Any = None
    state: InitState = field(default_factory=InitState)
    cfg: Any = None  # the RunConfig and DistContext it ran with (training after the gate goes on with them)
    ctx: Any = None

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


class InitRun:
    """The stages of `dpo-dist init`; each returns True when this rank may go on."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, debug: bool = False, keep_serving: bool = False):
        """keep_serving (placement ranks): leave the reference ranks serving after init, for a trainer that goes on
        training (dpo_dist.api.prepare); `dpo-dist init` ends them with the verdict."""
        self.cfg, self.ctx, self.debug, self.keep_serving = cfg, ctx, debug, keep_serving
        self.rr = RankReport(ctx.rank)
        self.state = InitState()  # what the stages hand each other
        self.placement = strategy_for(cfg.reference.placement)  # every placement-specific step is asked of it
        self.sharding = backend_for(cfg)  # and every sharding-specific one of the backend (dpo_dist.sharding)
        if ctx.roles is not None:  # placement ranks: this policy rank's line to its reference rank, from the start
            from dpo_dist.reference.rank_server import RemoteReference

            self.state.remote = RemoteReference(ctx.roles, ctx.device)

    # -- stages -------------------------------------------------------------------------------------------------
    def setup(self) -> bool:
        from transformers import set_seed

        cfg, s = self.cfg, self.state
        if not self.sharding.setup(self) or not self.sharding.refuse_placement(self):
            return False
        placement = cfg.reference.placement
        if not self.placement.check_setup(self):
            return False
        bad_world = world_problem(self.ctx.roles.world if self.ctx.roles is not None else self.ctx.world_size)
        if bad_world:
            return self.rr.add("world matches the launch", False, *bad_world)
        set_seed(cfg.train.seed)
        smoke = self.placement.smoke_steps(cfg.verify.smoke_steps)
        s.smoke_steps = smoke
        if smoke:  # training after the gate runs under the config's own schedule: built (and checked) now, first
            s.train_fields = training_fields(build_dpo_config(cfg, None, 0, self.placement.trl_precompute))
        s.args = build_dpo_config(cfg, s.ds, smoke, precompute=self.placement.trl_precompute,
                                  backend_kwargs=self.sharding.trainer_kwargs(self))
        self.rr.facts.update(sharding=s.ds_label, zero_stage=s.stage, backend=self.sharding.name,
                             placement=placement, world_size=self.ctx.world_size,
                             output_dir=str(Path(cfg.train.output_dir)), smoke_steps=smoke,
                             rank_run_id=self.ctx.run_id)
        roles = self.ctx.roles
        world = f"world {self.ctx.world_size}" if roles is None else \
            f"{roles.policy_ranks} policy + {roles.reference_ranks} reference rank(s) of {roles.world} processes"
        return self.rr.add("configuration", True, f"{self.sharding.describe(s)}, reference {placement}, {world}")

    def tokenizer(self) -> bool:
        cfg, ctx, rr = self.cfg, self.ctx, self.rr
        pol_path = resolve_model_path(cfg.model.path)
        ref_path = resolve_model_path(cfg.reference.path) if cfg.reference.path else pol_path
        # The CLI ran these before launch; the Python API (api.prepare) comes straight here, so they run again.
        check_checkpoint(pol_path, cfg, "model")
        if ref_path != pol_path:
            check_checkpoint(ref_path, cfg, "reference")
        conf = models.read_config_json(pol_path)
        tok = models.load_tokenizer(pol_path, cfg.model.trust_remote_code)
        ok = model_checks.check_tokenizer(tok, conf, cfg.model.pad_policy, rr, ctx.warn)
        if ref_path != pol_path:
            diffs = model_checks.same_tokenizer(tok, models.load_tokenizer(ref_path, cfg.model.trust_remote_code))
            ok &= rr.add("reference tokenizer equal", not diffs, "; ".join(diffs) or "identical",
                         "the reference checkpoint has another tokenizer: use the policy's SFT checkpoint")
        self.state.update(pol_path=pol_path, ref_path=ref_path, tok=tok)
        return ok

    def load(self) -> bool:
        from dpo_dist.load import fastload

        cfg, ctx, rr = self.cfg, self.ctx, self.rr
        s = self.state
        pol_path, ref_path = s.pol_path, s.ref_path
        t0 = time.perf_counter()
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # the user's own setting wins
            # glibc: large freed blocks (gathered ZeRO-3 layers, logits, read buffers) go back to the OS instead of
            # staying in the heap for the rest of the run (bench/README.md: +250-300 MiB per rank on 0.44B otherwise)
            rr.facts["malloc_mmap_threshold_pinned"] = fastload.pin_malloc_mmap_threshold()
        try:  # every loader decision first, the same on every rank, before anything is allocated
            pol_plan = self.fast_plan(pol_path)
            ref_plan = None
            if self.placement.loads_like_policy:  # loaded by load_causal_lm
                ref_plan = pol_plan if ref_path == pol_path else self.fast_plan(ref_path, "reference_loader")
        except ValueError as e:  # model.loader: fast, and it cannot be used
            return rr.add("model loader", False, str(e), str(e))
        s.ref_plan = ref_plan
        how = "fast partitioned loader" if pol_plan is not None else "from_pretrained"
        ctx.print0(f"[dpo-dist] loading policy from {pol_path} ({self.sharding.describe(s)}, {how}) ...")
        from dpo_dist.init import progress

        share = ctx.world_size if pol_plan is not None else 1  # the fast loader reads this rank's byte ranges only
        with progress.reading("loading policy", progress.checkpoint_bytes(pol_path) // share, ctx.print0):
            policy = self.sharding.load_model(self, pol_path, pol_plan, "policy")
        policy.train()
        s.policy = policy
        ctx.print0(f"[dpo-dist] loading reference ({cfg.reference.placement}) from {ref_path} ...")
        with progress.reading("loading reference", progress.checkpoint_bytes(ref_path) // share, ctx.print0):
            s.reference = self.placement.load(self)
        rr.facts["load_seconds"] = round(time.perf_counter() - t0, 3)
        rr.facts[f"rank_{ctx.rank}_policy_bytes"] = views.local_bytes(policy)
        rr.facts[f"rank_{ctx.rank}_reference_bytes"] = self.placement.reference_bytes(self)
        rr.facts[f"rank_{ctx.rank}_memory_kb"] = models.shared_memory_kb()
        rr.facts["partitioned"] = views.is_sharded(policy)
        return rr.add("models loaded", True, f"{sum(1 for _ in policy.parameters())} tensors, "
                      f"{rr.facts['load_seconds']} s, {how}")

    def fast_plan(self, path: Path, fact: str = "loader"):
        """The fast loader's plan for `path`, or None for from_pretrained (dpo_dist.init.loader_choice)."""
        return loader_choice.fast_plan(self, path, fact)

    def prove_static(self) -> bool:
        """Roles, configs, and bitwise weights equality (policy vs reference vs files)."""
        ctx, rr, s = self.ctx, self.rr, self.state
        ctx.print0("[dpo-dist] fingerprinting weights (each rank its own shard) ...")
        t0 = time.perf_counter()
        nonfinite: dict[str, int] = {}
        base = self.placement.base_view(s.policy)  # lora under FSDP2: the base under the checkpoint's names
        fp_pol = weights.model_fingerprints(base, ctx, "fingerprint policy", nonfinite)
        s.fp_policy = fp_pol
        rr.facts["fingerprints"] = {"policy": fp_pol}
        ok = weight_checks.check_finite(rr, nonfinite, "policy")
        ok &= self.sharding.audit(self)  # how the loaded models are sharded (FSDP2: the wrap of each)
        placed_ok, s.fp_reference = self.placement.static_checks(self, fp_pol)
        ok &= placed_ok
        if not self.placement.is_policy_base:  # a reference of its own (lora's is the policy's base)
            rr.facts["fingerprints"]["reference"] = s.fp_reference
        if self.cfg.verify.fingerprint_files:
            ok &= weight_checks.prove_files(rr, ctx, s.pol_path, base, fp_pol)
            if s.ref_path != s.pol_path and s.reference is not None:
                proof = weights.file_proof(s.ref_path, s.reference, ctx)
                rr.facts["fingerprints"]["reference_files"] = proof.fingerprints
        rr.facts["fingerprint_seconds"] = round(time.perf_counter() - t0, 3)
        return ok & check_manifest(self)

    def prove_forward(self) -> bool:
        """Generation, perplexity, tokenizer order and the initial KL, with every rank in step, before the trainer
        exists, sharing forwards (dpo_dist.verify.forward_proofs: what each proof costs). For lora the policy is
        wrapped with PEFT first: the reference is that PeftModel with its adapters off, and the trainer is handed the
        same PeftModel."""
        from dpo_dist.verify import forward_proofs

        cfg, ctx, rr, tok = self.cfg, self.ctx, self.rr, self.state.tok
        pol = self.placement.forward_policy(self)
        ref = self.state.reference
        ds = self.sharding.forward_config(self.state)
        synced = views.is_sharded(pol) and ctx.distributed
        cross = self.cross_device()
        pol.eval()
        try:
            with contextlib.ExitStack() as stack:
                p = stack.enter_context(probes.forward_ready(pol, ds, ctx))
                r = self.placement.forward_reference(self, stack, p, ds)
                vp, deterministic, counter = forward_proofs.prove(p, r, tok, cfg.verify, ctx, rr, synced, cross,
                                                                  self._progress("forward proofs"))
        finally:
            pol.train()
        rr.facts["forward_counts"] = counter.counts
        rr.facts["forward_seconds"] = counter.seconds
        if not cfg.verify.initial_kl:
            return True
        rr.facts["initial_kl"] = vp.kl
        rr.facts["initial_kl_policy_self"] = vp.self_kl
        return tolerances.kl_row(self, vp.kl, vp.self_kl, cross, pol, ref, self.placement.is_policy_base,
                                 deterministic)

    def cross_device(self) -> bool:
        """The reference's forwards run on other hardware than the policy's (cpu placement on an accelerator)."""
        return self.placement.cross_device(self.ctx)

    def data(self) -> bool:
        """Every row validated (preflight did too; the API comes straight here), standard prompts cut, and the
        chat-template checks on sampled rows rendered as TRL will render them. Needs only the tokenizer."""
        from dpo_dist.data import chat_template
        from dpo_dist.data.prepare import prepare  # pyarrow: imported here, after the forward proofs' peak
        from dpo_dist.data.sources import demo_note

        cfg, rr, tok, data = self.cfg, self.rr, self.state.tok, self.cfg.data
        first = self.ctx.local_rank == 0
        train = prepare(data.train, "train", data.train_split, tok, cfg.train.max_prompt_length, first)
        evald = prepare(data.eval, "eval", data.eval_split, tok, cfg.train.max_prompt_length, first) \
            if data.eval else None
        self.state.data = {"train": train, "eval": evald}
        cut = train.truncated_prompts + (evald.truncated_prompts if evald else 0)
        demo = demo_note(cfg.model.path, data.train)
        if demo:
            self.ctx.warn(demo)
        rr.facts["demo_train_data"] = bool(demo)
        rr.add("datasets valid", True, ("DEMO DATA: " if demo else "")
               + f"train {train.rows} rows ({train.fmt.describe()})"
               + (f", eval {evald.rows} ({evald.fmt.describe()})" if evald else "")
               + f"; {cut} prompts truncated to {cfg.train.max_prompt_length} tokens (standard prompts; kept their "
               "end)")
        rr.facts["truncated_prompts"] = cut
        rr.facts["identical_pairs"] = train.identical_pairs
        rr.facts["data_format"] = {"train": train.fmt.describe(), "eval": evald.fmt.describe() if evald else None}
        ok = chat_template.check(rr, tok, self.state.data, cfg)
        for role, hit in rr.facts.get("special_token_text", {}).items():
            self.ctx.warn(f"{hit['rows']} data.{role} row(s) hold special-token text (first: row {hit['row']} "
                          f"{hit['column']} holds {hit['token']!r}): the tokenizer makes it a control token")
        return ok

    def build(self) -> bool:
        from dpo_dist.data import chat_template

        cfg, rr, ctx, s = self.cfg, self.rr, self.ctx, self.state
        train = s.data["train"]
        args = s.args
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * ctx.world_size
        if train.rows < global_batch:
            return rr.add("train data fills one global batch", False, f"{train.rows} rows < global batch "
                          f"{global_batch}", f"the global batch is per_device_train_batch_size x "
                          f"gradient_accumulation_steps x world size = {args.per_device_train_batch_size} x "
                          f"{args.gradient_accumulation_steps} x {ctx.world_size}: lower them or add data")
        ctx.print0("[dpo-dist] building DPOTrainer ...")
        evald = s.data["eval"]
        datasets = {"train": train.dataset, "eval": evald.dataset if evald else None}
        pre = {}
        if self.placement.tokenize_before_trainer(cfg):
            from dpo_dist.data.tokenize_once import tokenize_once

            pre = tokenize_once(datasets, s.tok, s.args, tokenizer_key(s.tok), ctx.local_rank == 0, ctx.print0)
        trainer = self.placement.build_trainer(self, datasets["train"], datasets["eval"])
        s.trainer = trainer
        if pre.get("train"):  # the trainer's tokenized rows are the files tokenized before it existed
            reused = trainer.train_dataset.cache_files[:1] == [{"filename": pre["train"]}]
            rr.facts["tokenized_once"] = rr.facts[f"rank_{ctx.rank}_tokenized_once"] = reused
            if not reused:
                ctx.warn("TRL tokenized the train dataset again inside the trainer (its cache fingerprint differs "
                         "from dpo-dist's pre-run): correct, but the other ranks waited in TRL's barrier")
        ok_rows = chat_template.check_tokenized(rr, trainer, s.data, cfg)
        args = trainer.args
        rr.facts["global_batch"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * \
            ctx.world_size
        roles = ctx.roles
        if roles is not None:
            rr.facts.update(policy_ranks=roles.policy_ranks, reference_ranks=roles.reference_ranks,
                            launched_processes=roles.world)
            seen = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            rr.add("global batch counts policy ranks only", args.world_size == roles.policy_ranks,
                   f"{seen} = {args.per_device_train_batch_size} x "
                   f"{args.gradient_accumulation_steps} x P={args.world_size} (of W={roles.world}; the "
                   f"K={roles.reference_ranks} reference rank(s) do not train)",
                   "the trainer counted reference ranks in its world: report this as a dpo-dist bug")
        self.attach_kl_monitor(trainer)
        nbytes = self.placement.reference_bytes(self)  # measured once; check_trainer reads it from the facts
        rr.facts[f"rank_{ctx.rank}_reference_bytes_training"] = nbytes
        ok = self.placement.check_trainer(self, trainer) & ok_rows
        self.placement.report_row(rr, nbytes)
        return ok

    def attach_kl_monitor(self, trainer) -> None:
        from dpo_dist.train.kl_monitor import attach

        self.state.kl_monitor = attach(trainer, self.cfg, self.ctx, self.rr, self.state.tok,
                                       lambda prompts: self.placement.kl_reference(self, trainer))
        lineage.attach(trainer, self.state.lineage, self.ctx)  # checkpoints carry this run's identity

    def _progress(self, stage: str, after_s: float = 3.0):
        """Which step of a long stage runs, on rank 0's terminal once the stage has run `after_s` seconds (as the
        progress bars: a short stage stays one line); before that, and on other ranks, in the rank log only."""
        t0, ctx = time.perf_counter(), self.ctx

        def say(text: str) -> None:
            line = f"[dpo-dist] {stage}: {text}"
            log_only = getattr(sys.stdout, "log_only", None)
            if ctx.is_main and (time.perf_counter() - t0 >= after_s or log_only is None):
                print(line, flush=True)
            elif log_only is not None:
                log_only(line + "\n")
        return say

    def smoke(self) -> bool:
        n = self.state.smoke_steps
        if n <= 0:
            return True
        ctx, rr, trainer = self.ctx, self.rr, self.state.trainer
        ref_module = self.placement.smoke_reference(self, trainer)
        ref_before = weights.model_fingerprints(ref_module, ctx) if ref_module is not None else None
        model = trainer.model
        trainable = {nm for nm, p in model.named_parameters() if p.requires_grad}
        pol_before = weights.model_fingerprints(model, ctx, stored=True)  # an fp32 master's own bits
        monitor = self.state.kl_monitor
        before = rewind.take(trainer, ctx.rank, monitor)  # training after the gate starts here, not after the smoke
        rec = LossRecorder()
        trainer.add_callback(rec)
        ctx.print0(f"[dpo-dist] {n} smoke training step(s) ...")
        remote = self.state.remote
        waited = remote.wait_s if remote is not None else 0.0
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=self.cfg.train.resume_from)
        rr.facts["smoke_seconds"] = round(time.perf_counter() - t0, 3)
        if remote is not None:  # placement ranks: how long this rank waited for reference answers while training
            rr.facts[f"rank_{ctx.rank}_reference_wait_seconds"] = round(remote.wait_s - waited, 3)
        trainer.remove_callback(rec)
        losses = rec.losses
        rr.facts["kl_logged"] = rec.kl_logged
        if monitor is not None:
            rr.facts["kl_history"] = monitor.history
            rr.facts["kl_warnings"] = monitor.warnings
            if monitor.adaptive is not None:
                rr.facts["beta_changes"] = monitor.adaptive.changes
        rr.facts["smoke_losses"] = losses
        try:
            return self.smoke_rows(trainer, n, losses, model, trainable, pol_before, ref_module, ref_before)
        finally:  # the trainer handed back (and trained after the gate) starts from the proven state
            rewind.restore(before, trainer, monitor)
            use_training_fields(trainer, self.state.train_fields)  # under the run's schedule, not the smoke's

    def smoke_rows(self, trainer, n, losses, model, trainable, pol_before, ref_module, ref_before) -> bool:
        ctx, rr = self.ctx, self.rr
        if self.cfg.train.resume_from:  # a resumed policy is trained: its first loss is not ln 2
            ran = rr.add("resumed training ran", bool(losses), f"{len(losses)} steps after resuming, losses "
                         f"{[round(x, 4) for x in losses]}", "no step ran after resuming: check max_steps")
            return ran & rr.add("resumed loss continues the run",
                                **lineage.check_resumed_loss(self.cfg.train.resume_from, losses))
        ok = tolerances.step0_rows(self, trainer, losses)
        fp_after = weights.model_fingerprints(model, ctx, stored=True)
        still = [nm for nm in trainable if fp_after.get(nm) == pol_before.get(nm)]
        ok &= rr.add("every policy parameter moved", not still, f"{len(trainable)} tensors changed after {n} "
                     "step(s)" if not still else f"{len(still)} unchanged, e.g. {still[0]}",
                     "some trainable tensors did not change after a step: check the optimizer covers all parameters")
        if ref_module is not None:
            ok &= model_checks.reference_unmoved(ref_before, weights.model_fingerprints(ref_module, ctx), rr)
        return ok

    # -- driver -------------------------------------------------------------------------------------------------
    def attempt(self, name: str, fn) -> bool:
        try:
            liveness.mark(name)
            inject_fault(name, self.ctx.rank, self.state)
            return timed(self.rr, name, fn, self.ctx.print0)  # the timeline and the stage's line
        except Exception as e:
            if self.debug:
                traceback.print_exc()
            text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            if liveness.is_timeout(e):  # name the silent rank, not the error a clean-up raised on top
                value = hint = liveness.explain(self.cfg.sharding.timeout_s)
            elif isinstance(e, KNOWN_ERRORS):
                value, hint = text or type(e).__name__, text or type(e).__name__
            else:  # unexpected: keep the cause on one line, the traceback with --debug
                value, hint = f"{type(e).__name__}: {text}", "unexpected error: rerun with --debug for the traceback"
            if name in COLLECTIVE_STAGES and self.ctx.distributed:
                self.abandon(name, value)
            return self.rr.add(name, False, value, hint)

    def abandon(self, stage: str, cause: str) -> None:
        """A rank that fails inside a collective stage cannot reach the shared decision: its peers are waiting in a
        collective (a ZeRO-3 gather, an all-reduce) that it will never join. It says why in one line and exits at
        once; the launcher (torchrun's agent, srun --kill-on-bad-exit) then ends the other ranks within seconds,
        instead of every rank waiting for the collective timeout."""
        print(f"dpo-dist: rank {self.ctx.rank} failed in stage '{stage}': {cause} (ending this rank; the launcher "
              "stops the others)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def run(self) -> InitResult:
        # every placement, lora too: the forward proofs free their working set before the trainer exists (bench/).
        # The data stage comes after them: it imports datasets and pyarrow (+83 MiB of resident libraries per rank),
        # which would otherwise sit under the forward proofs' peak; the rows were validated in preflight already.
        for name, stage in (("setup", self.setup), ("tokenizer", self.tokenizer), ("load", self.load),
                            ("static proofs", self.prove_static), ("forward proofs", self.prove_forward),
                            ("data", self.data), ("trainer", self.build), ("smoke steps", self.smoke)):
            ok = self.attempt(name, stage)
            liveness.mark(f"{name}: done")  # a peer still in the stage itself is then told apart from this rank
            try:
                agreed = self.ctx.all_ok(ok)
            except Exception as e:  # a rank that never reaches the decision: a timeout naming it, not a traceback
                if not liveness.is_timeout(e):
                    raise
                self.abandon(f"agreeing after {name}", liveness.explain(self.cfg.sharding.timeout_s))
            if not agreed:
                self.ctx.print0(f"[dpo-dist] stopping after stage '{name}': a check failed on some rank")
                break
        remote = self.state.remote
        served = remote.reports(self.ctx) if remote is not None else []  # reference ranks' rows (placement ranks)
        reports = self.ctx.gather_objects(self.rr) + served
        rep = build_report(reports, to_dict(self.cfg))
        if remote is not None and not self.keep_serving:
            remote.close(rep["passed"])
        return InitResult(rep, self.state.trainer, self.state, self.cfg, self.ctx)


def finish(result: InitResult, ctx: DistContext, output_dir: str) -> int:
    """Rank 0 prints the table, writes report.json and names the first failure in one line; every rank returns the
    same exit code. A report that cannot be written (disk full, say) fails the run and leaves no partial file."""
    code = 0 if result.passed else 1
    if ctx.is_main:
        result.report["run_id"] = ctx.run_id  # the id the manifest and the output dir's lock carry too
        print(render_table(result.report["checks"]), flush=True)
        path = Path(output_dir) / "report.json"
        try:
            write_json_atomic(path, result.report)
        except OSError as e:
            print(f"dpo-dist: could not write {path} ({e.strerror or e}): free space or choose another --output-dir",
                  file=sys.stderr, flush=True)
            return 1
        verdict = "PASSED" if result.passed else "FAILED"
        print(f"[dpo-dist] quality gate {verdict}; report: {path}", flush=True)
        console.name_logs(result.report["world_size"])  # voice: the rank logs, named at the end
        if not result.passed:
            print(failure_line(result.report), file=sys.stderr, flush=True)
    return code

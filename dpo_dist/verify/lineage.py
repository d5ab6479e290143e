"""Resume lineage: a resumed trainer checkpoint must belong to this run, and its first loss must continue the run's.

The reference manifest proves the reference is the one init saw, but the policy comes from the trainer checkpoint:
one saved by another run of the same shape would load silently (issue 13.4: loss 13.7 after resuming, reported as a
pass). So init records a run identity in the manifest (the reference's and the initial policy's fingerprint digests
and a random run id), every checkpoint the trainer saves gets a marker with that identity, and a resume checks:

1. the marker is there and names this run (before anything trains);
2. the policy checkpoint path (model.path) still holds the policy init started from (its digest);
3. after the resumed steps, the first loss is within the run's own logged spread of the last logged loss
   (`trainer_state.json`'s log_history in the checkpoint): tolerance = the largest distance of the logged losses of
   the last window from the last one, plus the largest step-to-step change of the run: both measured from the run,
   no constant. With fewer than two logged losses there is no spread to derive it from, and the row says so.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from dpo_dist.verify.report import write_json_atomic

MARKER = "dpo_dist_lineage.json"
WINDOW = 8  # logged losses around the last one that set the spread; more would let a run's early descent dominate


def digest(fingerprints: dict[str, str]) -> str:
    """sha256 over every (name, fingerprint), sorted: one string for a whole model's weights."""
    h = hashlib.sha256()
    for name in sorted(fingerprints):
        h.update(f"{name}\0{fingerprints[name]}\n".encode())
    return h.hexdigest()


def new_identity(fp_reference: dict[str, str], fp_policy: dict[str, str], run_id: str | None = None
                 ) -> dict[str, str]:
    """run_id: the init's own id (DistContext.run_id, the same on every rank), else a fresh one."""
    return {"run_id": run_id or uuid.uuid4().hex, "reference_digest": digest(fp_reference),
            "policy_digest": digest(fp_policy)}


def write_marker(checkpoint: Path, identity: dict[str, str], step: int) -> None:
    write_json_atomic(checkpoint / MARKER, {**identity, "step": step})


def check_checkpoint(checkpoint: str | Path, identity: dict[str, str] | None,
                     fp_policy: dict[str, str]) -> list[str]:
    """Why this trainer checkpoint cannot be resumed in this run (empty: it belongs to it)."""
    if not identity:
        return ["the manifest in the output dir has no run identity (written by an older dpo-dist): re-run init "
                "into a new --output-dir"]
    problems = []
    if identity["policy_digest"] != digest(fp_policy):
        problems.append("model.path does not hold the policy this run started from: resume with the original "
                        "model.path")
    path = Path(checkpoint) / MARKER
    if not path.is_file():
        if _saved_here(Path(checkpoint), identity):
            return problems + [interrupted_save(Path(checkpoint))]
        return problems + [f"{checkpoint} has no {MARKER}: it was not saved by a dpo-dist run (or by an older one); "
                           "resume from a checkpoint-N this run saved"]
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return problems + [f"{path} is not readable JSON: resume from another checkpoint of this run"]
    for key, what in (("reference_digest", "another reference"), ("policy_digest", "another initial policy"),
                      ("run_id", "another init")):
        if marker.get(key) != identity.get(key):
            problems.append(f"{checkpoint} was saved by another run ({what}: {key} {str(marker.get(key))[:12]} vs "
                            f"{identity[key][:12]} in this output dir's manifest): resume from a checkpoint-N of "
                            "this run")
            break
    return problems


def _saved_here(checkpoint: Path, identity: dict[str, str]) -> bool:
    """A checkpoint-N folder inside the output dir whose manifest carries this run's identity: the trainer of this
    run started saving it (the marker is written last, after the trainer's own files)."""
    from dpo_dist.verify.manifest import MANIFEST

    try:
        manifest = json.loads((checkpoint.parent / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return checkpoint.name.startswith("checkpoint-") and (manifest.get("lineage") or {}).get("run_id") == \
        identity.get("run_id")


def interrupted_save(checkpoint: Path) -> str:
    """Why a checkpoint of this run cannot be resumed when its save never finished (issue 21, #93)."""
    names = {p.name for p in checkpoint.iterdir()} if checkpoint.is_dir() else set()
    missing = [what for what, there in (("optimizer state", any(n.startswith("global_step") or n.startswith(
        "optimizer") for n in names)), ("trainer_state.json", "trainer_state.json" in names)) if not there]
    lacks = f"it lacks {' and '.join(missing)} and " if missing else "it lacks "
    return (f"{checkpoint} was saved by this run but the save did not finish ({lacks}the {MARKER} written last): the "
            "run was stopped while saving; resume from the checkpoint-N before it")


def logged_losses(checkpoint: str | Path) -> list[float]:
    """The training losses the trainer logged up to this checkpoint (trainer_state.json's log_history)."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return []
    history = json.loads(path.read_text()).get("log_history", [])
    return [float(h["loss"]) for h in history if isinstance(h, dict) and "loss" in h]


def loss_tolerance(losses: list[float]) -> float | None:
    """How far the next loss may be from the last logged one, from the run's own losses: the largest distance of the
    last WINDOW losses from the last, plus the largest step-to-step change logged. None below two losses."""
    if len(losses) < 2:
        return None
    last = losses[-1]
    spread = max(abs(x - last) for x in losses[-WINDOW:])
    step = max(abs(b - a) for a, b in zip(losses, losses[1:], strict=False))
    return spread + step


def check_resumed_loss(checkpoint: str | Path, resumed: list[float]) -> dict[str, Any]:
    """{ok, value, hint}: the first resumed loss against the last logged loss of the checkpoint."""
    logged = logged_losses(checkpoint)
    tol = loss_tolerance(logged)
    if not resumed:
        return {"ok": False, "value": "no loss logged after resuming", "hint": "no step ran after resuming"}
    if tol is None:
        return {"ok": True, "value": f"not checked: {len(logged)} logged loss(es) in {checkpoint}, too few to derive "
                f"a tolerance (first resumed loss {resumed[0]:.4f})", "hint": ""}
    gap = abs(resumed[0] - logged[-1])
    return {"ok": gap <= tol,
            "value": f"first resumed loss {resumed[0]:.4f}, last logged {logged[-1]:.4f}: |diff| {gap:.4f}, "
                     f"tolerance {tol:.4f} (spread of the last {min(WINDOW, len(logged))} logged losses + largest "
                     "logged step change)",
            "hint": "the resumed policy does not continue this run's training (another model's checkpoint, or "
                    "corrupted optimizer/model states): resume from a checkpoint-N this run saved"}


def attach(trainer, identity: dict[str, str] | None, ctx) -> None:
    """Every checkpoint the trainer saves gets this run's marker (rank 0 writes it, after the trainer's own files)."""
    if not identity:
        return
    from transformers import TrainerCallback

    class LineageMarker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ctx.is_main and ckpt.is_dir():
                write_marker(ckpt, identity, state.global_step)
            return control

    trainer.add_callback(LineageMarker())

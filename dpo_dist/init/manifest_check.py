"""The end of the static proofs: init writes what the reference is (the manifest, the run's lineage); a resume
re-verifies the reference against that manifest, not against the policy, and its checkpoint against the lineage."""

from __future__ import annotations

from dpo_dist.config.schema import to_dict
from dpo_dist.data.keys import tokenizer_key
from dpo_dist.verify import lineage, manifest


def check_manifest(run) -> bool:
    cfg, rr, s = run.cfg, run.rr, run.state
    tok_key = tokenizer_key(s.tok)
    if cfg.train.resume_from:
        saved = manifest.read_manifest(cfg.train.output_dir)
        diffs = manifest.compare(saved, s.fp_reference, tok_key)
        ok = rr.add("reference == init manifest", not diffs,
                    f"{len(s.fp_reference)} tensors and the tokenizer as at init" if not diffs else
                    f"{len(diffs)} differ, first: {diffs[0]}",
                    f"the reference is not the one this run started with (first difference: "
                    f"{diffs[0] if diffs else ''}): resume with the original model.path/reference.path")
        s.lineage = saved.get("lineage")  # new checkpoints of the resumed run carry the same identity
        problems = lineage.check_checkpoint(cfg.train.resume_from, s.lineage, s.fp_policy)
        return ok & rr.add("resume checkpoint belongs to this run", not problems,
                           f"{lineage.MARKER} names this run (run id {s.lineage['run_id'][:12]})"
                           if not problems else problems[0], problems[0] if problems else "")
    s.lineage = lineage.new_identity(s.fp_reference, s.fp_policy, run.ctx.run_id)
    if run.ctx.is_main:
        path = manifest.write_manifest(cfg.train.output_dir, checkpoint=str(s.ref_path),
                                       placement=cfg.reference.placement, tokenizer=tok_key,
                                       fingerprints=s.fp_reference, config=to_dict(cfg), lineage=s.lineage,
                                       run_id=run.ctx.run_id)
        rr.facts["manifest"] = str(path)
    return True

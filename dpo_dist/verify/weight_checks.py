"""Static-proof rows about the weights themselves: every element finite, and the checkpoint files equal to the loaded
policy tensor by tensor, with every file tensor and every model tensor accounted for (dpo_dist.load.key_mapping)."""

from __future__ import annotations

from pathlib import Path

from dpo_dist.runtime.distributed import DistContext
from dpo_dist.verify import weights
from dpo_dist.verify.report import RankReport


def check_finite(rr: RankReport, nonfinite: dict[str, int], what: str) -> bool:
    """Every weight element finite: counted in the fingerprint pass (no extra read), all-reduced."""
    first = next(iter(nonfinite), "")
    rr.facts[f"nonfinite_{what}"] = nonfinite
    return rr.add(f"weights finite: {what}", not nonfinite,
                  "no inf/NaN element in any tensor" if not nonfinite else
                  f"{sum(nonfinite.values())} inf/NaN element(s) in {len(nonfinite)} tensor(s), first: {first} "
                  f"({nonfinite.get(first)})",
                  f"the {what} holds inf/NaN weights (first: {first}): the checkpoint is corrupt or was saved after "
                  "a diverged step; re-copy it or use an earlier checkpoint")


def prove_files(rr: RankReport, ctx: DistContext, path: Path, pol, fp_pol: dict[str, str]) -> bool:
    """The policy equals the checkpoint files bitwise, tensor by tensor under transformers' own key mapping, and the
    files hold nothing the model left out (a config.json with fewer layers than the files) and vice versa."""
    proof = weights.file_proof(path, pol, ctx, "fingerprint files")
    acct, fp_file, missing = proof.account, proof.fingerprints, proof.missing
    ok = rr.add("checkpoint files == model tensors (both ways)", acct.complete, acct.describe(),
                f"config.json does not describe the files in {path} ({acct.describe()}): check num_hidden_layers, "
                "vocab_size and the other sizes in config.json, or re-save the checkpoint with save_pretrained")
    rr.facts["file_account"] = {"renamed": acct.renamed, "tied": acct.tied, "converted": acct.converted,
                                "ignored": acct.ignored, "initialized": acct.initialized,
                                "unexplained_file": acct.unexplained_file, "unexplained_model": acct.unexplained_model}
    bad = [n for n in weights.compare(fp_pol, fp_file) if n not in missing and n not in proof.converted]
    conv = f"; {len(proof.converted)} converted by transformers on load, not compared bitwise" if proof.converted \
        else ""
    ok &= rr.add("weights: policy == checkpoint files", not bad and not missing,
                 f"{len(fp_file)} tensors match the safetensors files{conv}" if not (bad or missing) else
                 f"differ: {bad[:1]} missing in files: {missing[:1]}",
                 "the loaded policy is not what the files hold: investigate loading (dtype conversion) or a corrupted "
                 "copy")
    if proof.nonfinite:
        ok &= check_finite(rr, proof.nonfinite, "checkpoint files")
    elif rr.facts.get("nonfinite_policy"):
        explain_cast(rr, rr.facts["nonfinite_policy"], pol)
    rr.facts["fingerprints"]["files"] = fp_file
    return ok


FP16_MAX = 65504.0


def explain_cast(rr: RankReport, nonfinite: dict[str, int], pol) -> None:
    """The policy holds inf/NaN but the files it was loaded from are finite: the load made them, nearly always a cast
    to float16 of a weight beyond its range (bf16/fp32 checkpoints hold values up to ~3e38). Rewrite the policy row's
    hint to say so, instead of calling a sound checkpoint corrupt (issue 21, #50)."""
    first = next(iter(nonfinite))
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in pol.parameters()})
    for c in rr.checks:
        if c.name == "weights finite: policy" and not c.ok:
            c.value += "; the checkpoint files hold no inf/NaN"
            c.hint = (f"the checkpoint files are finite, so loading them in {'/'.join(dtypes)} made the inf/NaN "
                      f"(first: {first}): " + (f"float16 holds at most {FP16_MAX:g}; set model.dtype: bfloat16"
                                               if dtypes == ["float16"] else
                                               "check model.dtype and the conversion transformers applied on load"))

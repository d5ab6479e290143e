"""Per-component byte arithmetic of the memory planner: how many bytes each component of a role (the training
ranks, the reference ranks) takes in each phase, and what a node's host memory adds up to. `planner` assembles
these into plans; the dataclasses it takes as inputs (Cluster, RunSettings) are in `inputs`.

Accounting, per rank, per phase (load, init, train = forward/backward, step = optimizer step); a phase's peak is the
sum of the components live in it, and a layout's peak is its worst phase:
  w = bytes per parameter of the run dtype (2 for bf16), Psi = parameters, T = trainable parameters (Psi, or the LoRA
  adapters), P = ranks that train, L = the largest module's own parameters (DeepSpeed's "largest layer").
  ZeRO-3: weights w*Psi/P, gradients w*T/P (bf16 partition buffer), fp32 master 4*T/P, Adam 8*T/P; during step() the
  fp32 gradient of one sub-group, 4*min(sub_group_size, T/P); during forward/backward the largest gathered layer
  2*w*L (its parameters and full gradient) plus other parameters kept gathered up to stage3_max_live_parameters.
  ZeRO-2: weights w*Psi (replicated), the rest as ZeRO-3 but the step's fp32 gradient covers the whole partition.
  Offloading moves the optimizer part (gradient buffers, fp32 grads, master, Adam) and/or the weights to host memory.
  FSDP2 (a backend whose master copy is the parameter, config/backend_memory.py): trainable parameters sharded in
  fp32 (4*T/P, accelerate upcasts them under mixed precision bf16; the frozen rest w/P), gradients and Adam in the
  parameter's dtype (4*T/P, 8*T/P), no fp32 step copy; gathered: the root unit's own parameters R (embeddings, head,
  final norm: unsharded from forward to backward) + two decoder layers D (one computing, one prefetched), w*(R+2D),
  and one unit's full gradient with its fp32 reduce-scatter copy (w+4)*max(R, D). CPU offload moves the policy's
  shards, gradients and Adam to host memory, not the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpo_dist.config.backend_memory import backend_memory_of
from dpo_dist.config.placement_memory import memory_of
from dpo_dist.plan.inputs import DTYPE_BYTES, Cluster, GiB, RunSettings

PHASES = ("load", "init", "train", "step")
# TRL 1.16 fused LM head (trl/kernels/chunked_logprob.py): tokens and vocabulary columns per projection tile.
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = 32768


@dataclass(frozen=True)
class Component:
    """Bytes one rank holds for one purpose, and the phases it is live in."""

    name: str
    gpu: int = 0  # on the accelerator (device="cpu": in the rank's own memory)
    host: int = 0  # in the rank's host memory, private
    host_shared: int = 0  # in host memory once per node (mmapped files, page cache), counted in each rank's RSS
    phases: tuple[str, ...] = PHASES
    note: str = ""


@dataclass(frozen=True)
class RolePlan:
    """One kind of rank: 'train' ranks hold the policy; 'reference' ranks (placement ranks) hold the reference."""

    role: str
    ranks: int
    components: tuple[Component, ...]

    def phase_gpu(self, phase: str) -> int:
        return sum(c.gpu for c in self.components if phase in c.phases)

    def phase_host_private(self, phase: str) -> int:
        return sum(c.host for c in self.components if phase in c.phases)

    def phase_host_shared(self, phase: str) -> int:
        return sum(c.host_shared for c in self.components if phase in c.phases)

    def phase_rank_rss(self, phase: str, cpu: bool) -> int:
        """What the rank's resident set shows (private + shared pages; on CPU the "GPU" part too)."""
        own = self.phase_host_private(phase) + self.phase_host_shared(phase)
        return own + (self.phase_gpu(phase) if cpu else 0)

    def peak_gpu(self) -> tuple[int, str]:
        return max((self.phase_gpu(ph), ph) for ph in PHASES)


def activation_bytes_per_token(m: dict[str, Any], w: int, checkpointing: bool) -> int:
    """Bytes autograd saves per token for backward, whole model. Fitted to transformers 5.23 Llama/Qwen2/Mixtral with
    SDPA (tests/test_planner.py measures it on real small models): per decoder layer w*(10h + 4i*k + 2*h_kv) plus
    fp32 row statistics (4 bytes per head, 8 per token), + w*2h*k + 4E for the MoE routing; outside the layers
    w*3h + 2*head_dim + 12. With gradient checkpointing a layer keeps only its input (w*h) and one layer is
    recomputed at a time."""
    h, i, k, e = m["hidden_size"], m["intermediate_size"], m["experts_per_token"], m["num_experts"]
    h_kv = m["num_kv_heads"] * m["head_dim"]
    layer = w * (10 * h + 4 * i * k + 2 * h_kv) + 4 * m["num_heads"] + 8
    if e > 1:
        layer += w * 2 * h * k + 4 * e
    outside = w * 3 * h + 2 * m["head_dim"] + 12
    if checkpointing:
        return m["num_layers"] * w * h + layer + outside
    return m["num_layers"] * layer + outside


def logits_bytes(m: dict[str, Any], tokens: int, w: int, mode: str, trainable_head: bool) -> int:
    """The LM head's working memory for one micro-batch (chosen+rejected) with gradients."""
    v, h = m["vocab_size"], m["hidden_size"]
    if mode == "full":
        return 2 * 4 * v * tokens  # fp32 logits [2b, T, V] and their gradient
    tile = w * min(tokens, TRL_TOKEN_CHUNK) * min(v, TRL_VOCAB_CHUNK)
    # saved hidden copy (w*h/token), fp32 grad of the hidden (4h/token), one tile, fp32 grad of the head weight
    return tokens * (w + 4) * h + tile + (4 * v * h if trainable_head else 0)


def full_logits_bytes(m: dict[str, Any], tokens: int) -> int:
    """fp32 [2b, T, V]: what a micro-batch's logits weigh when materialized."""
    return 4 * m["vocab_size"] * tokens


def reference_forward_bytes(m: dict[str, Any], tokens: int, w: int, mode: str) -> int:
    """A no-grad forward keeps one layer's intermediates, plus its logits ('full') or one tile ('fused')."""
    h, i, k, v = m["hidden_size"], m["intermediate_size"], m["experts_per_token"], m["vocab_size"]
    layer = w * tokens * (2 * h + 3 * i * k)
    if mode == "full":
        return layer + 4 * v * tokens
    return layer + w * min(tokens, TRL_TOKEN_CHUNK) * min(v, TRL_VOCAB_CHUNK)


def host_node(roles: tuple[RolePlan, ...], phase: str, cluster: Cluster) -> int:
    """Host bytes of one node: its ranks' private memory (the hungriest role on every rank: conservative when the
    reference ranks share nodes with training ranks) plus what the node's ranks share once."""
    cpu = cluster.device == "cpu"
    per_rank = max(r.phase_host_private(phase) + (r.phase_gpu(phase) if cpu else 0) for r in roles)
    shared = max(r.phase_host_shared(phase) for r in roles)
    return cluster.gpus_per_node * (per_rank + cluster.runtime) + shared


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def wrap_units(m: dict[str, Any]) -> tuple[int, int]:
    """(the root unit's own parameters, one decoder layer's) of a model sharded per decoder layer then at the root:
    the layers share the parameters outside the embeddings and head equally."""
    outer = m["embedding_params"] + m["lm_head_params"]
    layer = max(0, m["params"] - outer) // max(1, m["num_layers"])
    return m["params"] - layer * m["num_layers"], layer


def train_role(m: dict[str, Any], s: RunSettings, c: Cluster, p: int, shard_bytes: int) -> RolePlan:
    w = DTYPE_BYTES[s.dtype]
    psi, big = m["params"], m["largest_layer_params"]
    z3 = s.zero_stage == 3
    bm = backend_memory_of(s.backend)  # how the backend lays states and gathers out (config/backend_memory.py)
    ref = memory_of(s.placement)  # what the placement puts on this rank (config/placement_memory.py)
    lora = ref.trains_adapters
    trainable = s.lora_rank * m["lora_params_per_rank"] if lora else psi
    t_part = _ceil_div(trainable, p)
    mixed = w < 4  # bf16/fp16: fp32 master copy and fp32 gradients at step time
    opt_host = s.offload_optimizer
    weights_host = s.offload_params
    tokens = 2 * s.micro_batch * s.max_length
    bucket = w * (s.reduce_bucket_size or m["hidden_size"] ** 2) * (1 if z3 else 2)  # ZeRO-2: overlap_comm x2
    comps: list[Component] = []

    def put(name: str, nbytes: int, on_host: bool, phases=PHASES, note: str = "") -> None:
        comps.append(Component(name, gpu=0 if on_host else nbytes, host=nbytes if on_host else 0, phases=phases,
                               note=note))

    if bm.master == "parameter":  # the sharded parameter is the master copy: upcast where mixed precision is on
        mw = 4 if mixed and s.mixed_precision != "no" else w
        frozen = psi - trainable if lora else 0
        put("policy weights", w * _ceil_div(frozen, p) + (mw * t_part if mw == w else 0), weights_host,
            note="sharded parameters in the model dtype" + (" (the frozen base)" if lora else "")
            + (", offloaded" if weights_host else ""))
        if mw != w:
            put("fp32 master weights", mw * t_part, weights_host, PHASES,
                note="the trainable parameters' shards, upcast to fp32 (mixed precision bf16): the master copy")
        put("gradients", mw * t_part, opt_host, PHASES[2:], "sharded gradients in the parameter's dtype")
        put("Adam states", 2 * mw * t_part, opt_host, PHASES[2:], "exp_avg + exp_avg_sq in the parameter's dtype")
        mixed = False  # no fp32 gradient copy at step time: the gradients already are in the master's dtype
    else:
        base = w * (_ceil_div(psi, p) if z3 else psi)
        if lora:
            base += w * (t_part if z3 else trainable)
        put("policy weights", base, weights_host,
            note=("ZeRO-3 partition" if z3 else "replicated (ZeRO-2)") + (", offloaded" if weights_host else "")
            + (f", incl. LoRA r={s.lora_rank}: {trainable:,} trainable" if lora else ""))
        put("gradients", w * t_part, opt_host, PHASES[2:],
            "bf16 gradient partition" if w == 2 else "gradient partition")
        if mixed:
            put("fp32 master weights", 4 * t_part, opt_host, PHASES[2:])
        put("Adam states", 8 * t_part, opt_host, PHASES[2:], "exp_avg + exp_avg_sq, fp32")
    if mixed:
        if opt_host:
            put("fp32 step gradients", 4 * t_part, True, PHASES[2:], "pinned fp32 gradient buffer (offload)")
        elif z3:
            put("fp32 step gradients", 4 * min(s.sub_group_size, t_part), False, ("step",),
                "fp32 gradient of one optimizer sub-group, during step()")
        else:
            put("fp32 step gradients", 4 * t_part, False, ("step",), "fp32 gradient partition, during step()")
        if opt_host and not z3:
            put("bf16 param buffer", w * t_part, True, PHASES[2:], "ZeRO-2 offload copy-back buffer")

    # reference on training ranks
    if ref.weights == "like_policy":
        note = ref.weights_note or ("ZeRO-3 partition" if z3 else "stage-0 replica under ZeRO-2 (reference.on_zero2)")
        put("reference weights", w * (_ceil_div(psi, p) if z3 else psi),
            weights_host and z3 and bm.offload_moves_reference, ref.weights_phases, note)
    elif ref.weights == "host_mmap":
        nbytes = w * psi
        comps.append(Component("reference weights", host_shared=nbytes if s.checkpoint_mmap_shared else 0,
                               host=0 if s.checkpoint_mmap_shared else nbytes,
                               phases=ref.weights_phases,
                               note="unsharded in host memory" + (", one mmapped copy per node"
                                                                   if s.checkpoint_mmap_shared else "")))

    # gathered parameters (ZeRO-3: modules; FSDP2: wrap units) / the largest layer's gradient before bucketing (ZeRO-2)
    if bm.gather == "unit":
        root, layer = wrap_units(m)
        n = bm.prefetch_units
        put("largest gathered layer", w * (root + n * layer), False, ("init", "train"),
            f"all-gather buffers: the root unit's own {root:,} params (embeddings, head) + {n} decoder layers of "
            f"{layer:,} (one computing, one prefetched)")
        if not lora:
            put("unsharded gradient", (w + bm.reduce_bytes) * max(root, layer), False, ("train",),
                "one unit's full gradient and its fp32 reduce-scatter copy")
    elif z3:
        live = w * max(0, min(psi, s.max_live_parameters) - big)
        grad_big = 0 if lora else w * big
        put("largest gathered layer", w * big + grad_big, False, ("train",),
            f"{m['largest_layer_name']}: {big:,} params, bf16 weights + full gradient")
        put("live parameters", live, False, ("init", "train"),
            "other parameters ZeRO-3 keeps gathered (stage3_max_live_parameters)")
        put("gathered while loading", w * big, False, ("load",), "GatheredParameters of one module")
        put("gathered (init forwards)", w * big, False, ("init",), "one module at a time")
    else:
        put("largest gathered layer", 0 if lora else w * big, False, ("train",),
            "LoRA: the frozen base has no gradients" if lora else "full gradient of the largest layer before "
            "bucketing")
    if bm.reduce_bucket:
        put("ZeRO buffers", bucket, False, ("train",), "reduce bucket" + (" x2 (overlap_comm)" if not z3 else ""))

    # activations and logits of one micro-batch
    act = tokens * activation_bytes_per_token(m, w, s.gradient_checkpointing)
    put("activations", act, False, ("train",), f"{tokens:,} tokens (2 x {s.micro_batch} x {s.max_length})"
        + (", checkpointed" if s.gradient_checkpointing else ""))
    head_trainable = not lora
    put("logits", logits_bytes(m, tokens, w, s.logits, head_trainable), False, ("train",),
        f"{s.logits}: full fp32 logits would be {full_logits_bytes(m, tokens) / GiB:.2f} GiB")
    if ref.forward != "none":
        put("reference forward", reference_forward_bytes(m, tokens, w, s.logits), ref.forward == "host",
            (ref.forward_phase,), ref.forward_note)

    # loading: ZeRO-3 builds partitioned (zero.Init) and rank 0 reads the files; ZeRO-2 loads full copies per rank
    comps.append(Component("checkpoint pages", host_shared=shard_bytes, phases=("load",),
                           note="largest checkpoint file, mapped while it is read (page cache)"))
    if not z3:
        n_full = 1 + (1 if ref.weights == "like_policy" else 0)
        comps.append(Component("full copies while loading", host=n_full * w * psi, phases=("load",),
                               note="ZeRO-2: from_pretrained materializes the whole model on every rank"))
    return RolePlan("train", p, tuple(comps))


def reference_role(m: dict[str, Any], s: RunSettings, k: int, shard_bytes: int) -> RolePlan:
    w = DTYPE_BYTES[s.dtype]
    psi, big = m["params"], m["largest_layer_params"]
    tokens = 2 * s.micro_batch * s.max_length
    comps = (
        Component("reference weights", gpu=w * _ceil_div(psi, k), note=f"ZeRO-3 inference partition over {k} ranks"),
        Component("largest gathered layer", gpu=w * big, phases=("load", "init", "train"), note="one module"),
        Component("live parameters", gpu=w * max(0, min(psi, s.max_live_parameters) - big), phases=("init", "train"),
                  note="stage3_max_live_parameters"),
        Component("reference forward", gpu=reference_forward_bytes(m, tokens, w, s.logits), phases=("train",),
                  note="no-grad forward of one micro-batch"),
        Component("checkpoint pages", host_shared=shard_bytes, phases=("load",), note="largest checkpoint file"),
    )
    return RolePlan("reference", k, comps)


__all__ = ["GiB", "PHASES", "DTYPE_BYTES", "Component", "RolePlan", "activation_bytes_per_token", "logits_bytes",
           "full_logits_bytes", "reference_forward_bytes"]

"""Process-group helpers for the distributed tests: :func:`spawn` starts ``n`` ranks on gloo (localhost,
one thread each) running a module-level worker of this file, each writing its result under ``out``."""
from __future__ import annotations

import datetime
import os
import socket
import time

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn_name, rank, n, port, out, args, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n))
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        res = globals()[fn_name](rank, n, *args)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    except BaseException as e:   # the test reads what each rank raised
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn_name, n, out, *args, timeout=120, collective_timeout=60):
    """Run worker ``fn_name(rank, n, *args)`` on ``n`` ranks; -> (exit codes, results, errors) per rank.
    Ranks still running after ``timeout`` seconds are killed (exit code None: they hung)."""
    import multiprocessing as mp
    os.makedirs(out, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn_name, r, n, port, out, args, collective_timeout))
             for r in range(n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    res, errs = [], []
    for r in range(n):
        f = os.path.join(out, f"rank{r}.pt")
        res.append(torch.load(f, weights_only=False) if os.path.exists(f) else None)
        e = os.path.join(out, f"rank{r}.err")
        errs.append(open(e).read() if os.path.exists(e) else None)
    return codes, res, errs


# ============================================================================================ workers
def scores_fixture(seed=0, dtype=torch.float32):
    """Score tensors with odd shapes, ties, zeros and a 1-D tensor, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (33, 17, 3, 3), (1,), (64, 40), (5, 9, 1, 1), (130, 3), (2, 70)]
    out = {}
    for i, s in enumerate(shapes):
        t = torch.randint(0, 40, s, generator=g).to(dtype) / 8   # many ties
        out[f"layer{i}.weight"] = t
    return out


def topk_worker(rank, n, cases):
    from spare_kernels.distributed import current_world, reduce_scatter_scores, shard_plan, sharded_topk_masks
    world = current_world()
    full = scores_fixture()
    # each rank holds a part: the full scores split into n addends
    part = {k: (v * (rank + 1)) / sum(range(1, n + 1)) for k, v in full.items()}
    plan = shard_plan({k: v.shape for k, v in full.items()}, n, bucket_elems=2000)
    owned = reduce_scatter_scores(part, world, plan)
    results = {}
    for gran, scope, dens in cases:
        m = sharded_topk_masks(owned, plan, dens, world, gran, scope, block=(4, 3))
        results[(gran, scope, dens)] = {k: v.data.clone() for k, v in m.items()}
    return {"owned": {k: v.clone() for k, v in owned.items()}, "masks": results}


def small_task():
    from spare_kernels.unlearn import canvas_task
    from spare_kernels import canvas
    return canvas_task("style:" + canvas.STYLES[0], n_forget=8, n_retain=16)


def run_worker(rank, n, cfg_kw, out_dir=None, resume=False):
    """``run`` of MiniCanvas on the small task; -> the adapter parameters, masks and the result."""
    from spare_kernels import canvas
    from spare_kernels.unlearn import Config, run
    torch.manual_seed(1234 + rank)   # the run must not depend on the global RNG's state per rank
    unet = canvas.load_model()
    res = run(unet, small_task(), Config(**cfg_kw), out_dir=out_dir, resume=resume, progress=False)
    params = {k: v.detach().clone() for k, v in unet.named_parameters() if v.requires_grad}
    return {"params": params, "history": res["history"], "world_size": res["world_size"],
            "per_rank_batch": res["per_rank_batch"], "mask_density": res["mask_density"]}


def saliency_worker(rank, n, stats):
    """Each rank: its share of two fixed batches on the tiny UNet; -> {stat: (owned scores, plan names)}."""
    from spare_kernels.distributed import current_world, sharded_saliency
    world = current_world()
    unet, batches = saliency_fixture()
    out = {}
    for stat in stats:
        def mine():
            for x, t, c, noise in batches:
                s = slice(rank * x.shape[0] // n, (rank + 1) * x.shape[0] // n)
                yield x[s], t[s], c[s], noise[s], (s.stop - s.start) / x.shape[0]
        owned, plan = sharded_saliency(unet, mine(), diffusion_loss, stat, None, world)
        out[stat] = ({k: v.clone() for k, v in owned.items()}, plan.owned(rank))
    return out


def saliency_fixture():
    from spare_kernels import canvas
    unet = canvas.load_model().requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        c = torch.randn(4, 8, unet.config.cross_attention_dim, generator=g)
        batches.append((x, t, c, torch.randn(4, 3, 32, 32, generator=g)))
    return unet, batches


def diffusion_loss(unet, batch):
    x, t, c, noise = batch[:4]
    loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=c).sample, noise)
    return loss * batch[4] if len(batch) > 4 else loss


def fault_worker(rank, n, how, cfg_kw):
    """``run`` where rank 1 dies (``os._exit``) or raises at its second step; rank 0 must stop with an
    error, not hang."""
    from spare_kernels.unlearn import trainer
    step = trainer.Trainer.step
    calls = [0]

    def faulty(self, clock=None):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            if how == "die":
                os._exit(7)
            raise RuntimeError("planted failure on rank 1")
        return step(self, clock)
    trainer.Trainer.step = faulty
    return run_worker(rank, n, cfg_kw)


def mismatch_worker(rank, n, cfg_kw):
    """Rank 1 runs with another seed: both ranks must refuse before any work."""
    return run_worker(rank, n, dict(cfg_kw, seed=cfg_kw.get("seed", 0) + rank))


def stuck_worker(rank, n, cfg_kw, stall_s):
    """``run`` where rank 1 stalls (alive, silent) for ``stall_s`` at its second step."""
    from spare_kernels.unlearn import trainer
    step = trainer.Trainer.step
    calls = [0]

    def stalled(self, clock=None):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            time.sleep(stall_s)
        return step(self, clock)
    trainer.Trainer.step = stalled
    return run_worker(rank, n, cfg_kw)


def nan_worker(rank, n, name):
    """A NaN in rank 1's part of one score tensor: every rank must raise, naming it."""
    from spare_kernels.distributed import current_world, reduce_scatter_scores, shard_plan, sharded_topk_masks
    world = current_world()
    full = scores_fixture()
    if rank == 1:
        full[name].view(-1)[3] = float("nan")
    plan = shard_plan({k: v.shape for k, v in full.items()}, n, bucket_elems=2000)
    owned = reduce_scatter_scores(full, world, plan)
    return sharded_topk_masks(owned, plan, 0.5, world)


def gradsync_worker(rank, n, cfg_kw, bucket_bytes):
    """One backward with small gradient buckets: how many were launched by the hooks before the
    backward returned, and the summed gradients."""
    from spare_kernels import canvas
    from spare_kernels.distributed import current_world
    from spare_kernels.unlearn import Config, Trainer
    from spare_kernels.unlearn.distributed import GradSync
    world = current_world()
    with Trainer(canvas.load_model(), small_task(), Config(**cfg_kw), overlap=False) as tr:
        if world.distributed:
            tr.sync.close()
            tr.sync = GradSync(tr.params, world, bucket_bytes=bucket_bytes)
        loss, _, _ = tr.loss()
        loss.backward()
        launched = tr.sync._next if tr.sync else 0
        buckets = len(tr.sync.buckets) if tr.sync else 0
        if tr.sync:
            tr.sync.finish()
        return {"launched_in_backward": launched, "buckets": buckets,
                "grads": [p.grad.clone() for p in tr.params]}


def tiny_flux():
    """A FluxTransformer2DModel from a small config (2 double-stream + 2 single-stream blocks), frozen,
    with fixed weights, and two batches of its inputs (image tokens, text tokens, noise)."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                   pooled_projection_dim=12, axes_dims_rope=(4, 6, 6)).requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 16, 4, generator=g), torch.randn(4, 8, 24, generator=g), torch.randn(4, 12, generator=g),
                torch.rand(4, generator=g), torch.randn(4, 16, 4, generator=g)) for _ in range(2)]
    return model, batches


def flux_loss(model, batch):
    x, ctx, pooled, t, noise = batch[:5]
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    img_ids = img_ids.reshape(-1, 3)
    out = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                img_ids=img_ids, txt_ids=torch.zeros(ctx.shape[1], 3), return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out, noise)
    return loss * batch[5] if len(batch) > 5 else loss


def stream_worker(rank, n, stats, bucket_elems):
    """Each rank: its share of tiny_flux's two batches, the statistics reduced while the backward runs
    (stream) and after it (the full local buffer); -> {stat: {mode: (owned, plan names, stats)}}."""
    from spare_kernels.distributed import current_world, sharded_saliency
    world = current_world()
    model, batches = tiny_flux()

    def mine():
        for b in batches:
            s = slice(rank * b[0].shape[0] // n, (rank + 1) * b[0].shape[0] // n)
            yield tuple(v[s] for v in b) + ((s.stop - s.start) / b[0].shape[0],)
    out = {}
    for stat in stats:
        for stream in (True, False):
            st = {}
            owned, plan = sharded_saliency(model, mine(), flux_loss, stat, None, world, stream=stream, stats=st,
                                           bucket_elems=bucket_elems)
            total = sum(plan.numel(i) for i in range(len(plan.names)))
            out.setdefault(stat, {})[stream] = ({k: v.clone() for k, v in owned.items()}, plan.owned(rank), st, total)
    return out


def many_scores(seed=0):
    """Several hundred score tensors of varied shapes (a few large), with many ties, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(300):
        big = i % 97 == 5
        rows = int(torch.randint(1, 40, (1,), generator=g)) * (40 if big else 1)
        cols = int(torch.randint(1, 70, (1,), generator=g)) * (3 if big else 1)
        out[f"blocks.{i}.weight"] = torch.randint(0, 200, (rows, cols), generator=g).float() / 16
    return out


def bound_worker(rank, n, densities, round_bytes):
    """The exact distributed top-k over many tensors (rank 0 holds the scores, the others zeros: the sums
    are exact): -> this rank's owned numel, the plan's total and largest tensor, and the masks."""
    from spare_kernels import distributed as D
    world = D.current_world()
    full = many_scores()
    part = {k: (v.clone() if rank == 0 else torch.zeros_like(v)) for k, v in full.items()}
    plan = D.shard_plan({k: v.shape for k, v in full.items()}, n, bucket_elems=20000)
    owned = D.reduce_scatter_scores(part, world, plan)
    D.GATHER_BYTES = round_bytes   # many all-gather rounds
    masks = {d: {k: m.data.clone() for k, m in D.sharded_topk_masks(owned, plan, d, world).items()} for d in densities}
    sizes = [plan.numel(i) for i in range(len(plan.names))]
    return {"owned_numel": sum(v.numel() for v in owned.values()), "plan_owned_numel": plan.owned_numel(rank),
            "total": sum(sizes), "largest": max(sizes), "masks": masks}


def dit_run_worker(rank, n, cfg_kw):
    """``run`` of the spare recipe on a tiny MiniCanvas-DiT (SD3 MMDiT, rectified flow); -> adapters,
    masks and the result."""
    from test_flow_recipe import tiny_dit

    from spare_kernels.unlearn import Config, canvas_task, run
    torch.manual_seed(1234 + rank)
    dit = tiny_dit()
    task = canvas_task("style:dots", n_forget=8, n_retain=16, model="dit")
    res = run(dit, task, Config(**cfg_kw), progress=False)
    params = {k: v.detach().clone() for k, v in dit.named_parameters() if v.requires_grad}
    return {"params": params, "history": res["history"], "world_size": res["world_size"],
            "mask_density": res["mask_density"]}

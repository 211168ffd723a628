"""The ``parallelism`` group -> a Lightning strategy, and the checks on it.

``parallelism.mode`` (not "strategy": that name is the row-selection group's) is ``auto``
(one process), ``ddp`` or ``fsdp2``; ``auto`` and ``ddp`` are Lightning strategy names as
they are. ``fsdp2`` is FSDP2
(``fully_shard``) through Lightning's ModelParallelStrategy, which also runs on CPU (gloo),
where Lightning's FSDPStrategy refuses a CPU accelerator. The sharding itself is applied by
``CausalLMTuner.configure_model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only

if TYPE_CHECKING:
    from loki_exp.config_schema import Parallelism

MODES = ("auto", "ddp", "fsdp2")


def lightning_strategy(par: Parallelism) -> str | Strategy:
    if par.mode == "fsdp2":
        return ModelParallelStrategy(
            data_parallel_size=par.devices * par.num_nodes, tensor_parallel_size=1,
            save_distributed_checkpoint=par.save_distributed_checkpoint)
    return par.mode


def kva_strategy(par: Parallelism) -> str | Strategy:
    """KVA splits the probe prompts over the ranks, each holding the whole model; under
    ``fsdp2`` that is DDP (sharding would only add gathers: the attribution is a forward and
    backward per prompt, and the paper ran it for the 8B model on one GPU)."""
    return "ddp" if par.mode == "fsdp2" else lightning_strategy(par)


def ranks_started_together(strategy: Strategy) -> bool:
    """Whether this job's ranks were started by a launcher outside Lightning (torchrun, srun,
    mpirun), each running the script from the top at once; not a single process, and not
    ranks Lightning starts itself when rank 0 reaches ``fit``/``predict``."""
    env = getattr(strategy, "cluster_environment", None)
    return (env is not None and env.creates_processes_externally
            and not isinstance(env, LightningEnvironment))


def is_global_zero() -> bool:
    """Rank 0 of a distributed run, or the only process (Lightning sets the rank from the
    environment it launches ranks with: LOCAL_RANK/NODE_RANK, SLURM_PROCID, RANK)."""
    return rank_zero_only.rank == 0

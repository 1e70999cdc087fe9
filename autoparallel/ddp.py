"""Our DistributedDataParallel wrapper: torch's DDP for the gradients, plus what existing scripts assume. Without
``find_unused_parameters`` or ``static_graph``, a first training step whose autograd graph leaves out a trainable
parameter is re-run under ``find_unused_parameters=True``; a model changed on every rank between the same two steps
(a new submodule, ``requires_grad``) rebuilds DDP at the next training forward. Forwards without autograd or in eval
mode run the plain module, with no collective to hang on; rank 0's buffers are broadcast after each training
forward, so eval, an EMA and checkpoints see rank 0's."""
from __future__ import annotations

import atexit
import gc
import inspect
import logging
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel
from torch.optim import optimizer as optimizer_hooks

from . import group
from .dropin import DropInWrapper, structure_generation, tensors
from .errors import UsageError

if TYPE_CHECKING:
    from .detect import Runtime

logger = logging.getLogger(__name__)

_OPTIONS = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {
    "self", "module", "device_ids", "output_device", "process_group"}
_UNUSED_WARNING = "find_unused_parameters=True was specified in DDP constructor, but did not find any unused"
_live: weakref.WeakSet[DistributedModel] = weakref.WeakSet()


def _release_reducers() -> None:
    """At exit, before the process group goes: DDP reducers left to the interpreter's final teardown
    sometimes aborted the process ("terminate called without an active exception")."""
    for model in list(_live):
        model.__dict__["_ddp"] = None
    gc.collect()


def _refuse_steps_after_eval_backward(optimizer: Any, *_: Any) -> None:
    flagged = [model for model in list(_live) if model.__dict__.get("_eval_backward")]
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]} if flagged else set()
    for model in flagged:  # only an optimizer of that model's parameters (a GAN's other optimizer may step)
        if any(id(p) in stepped for p in model.module.parameters()):
            raise UsageError("an optimizer step on gradients from a forward in eval mode: under DDP eval-mode forwards "
                             "skip gradient synchronisation (so evaluation never waits for other ranks), so these "
                             "gradients differ per rank. Call model.train() before training steps")


optimizer_hooks.register_optimizer_step_pre_hook(_refuse_steps_after_eval_backward)


def _graph_facts(output: Any, parameters: list[nn.Parameter]) -> tuple[bool, bool]:
    """(some trainable parameter is not in ``output``'s autograd graph, the graph has reentrant checkpoints)."""
    stack, seen = [t.grad_fn for t in tensors(output)], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    reached = {id(node.variable) for node in seen if hasattr(node, "variable")}  # AccumulateGrad: a parameter
    reentrant = any("CheckpointFunction" in node.name() for node in seen)
    return any(p.requires_grad and id(p) not in reached for p in parameters), reentrant


class DistributedModel(DropInWrapper, nn.Module):
    """The DDP wrapper ``wrap()`` returns under DDP, of ``module`` already on ``runtime.device``, once the process
    group exists; see the module docstring."""

    _autoparallel_wrapper = True

    def __init__(self, module: nn.Module, runtime: Runtime, sync_bn: bool = False, **ddp_options: Any) -> None:
        unknown = sorted(set(ddp_options) - _OPTIONS)
        if unknown:
            raise UsageError(f"wrap() got {', '.join(unknown)}, which DistributedDataParallel does not take: "
                             f"choose among {', '.join(sorted(_OPTIONS))}")
        if group.current() is None:
            raise UsageError("DDP needs an initialised process group: call autoparallel.runtime() first, inside a "
                             "job started by torchrun or autoparallel.launch()")
        if sync_bn and runtime.device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module).to(runtime.device)
        elif sync_bn:
            logger.warning("sync_bn=True ignored on %s: torch's SyncBatchNorm runs on GPUs only; BatchNorm statistics "
                           "stay per process", runtime.device)
        super().__init__()
        self.module = module
        device_ids = [runtime.device.index or 0] if runtime.device.type == "cuda" else None
        sync_buffers = ddp_options.pop("broadcast_buffers", ddp_options.pop("forward_sync_buffers", True))
        decided = "find_unused_parameters" in ddp_options or ddp_options.get("static_graph", False)
        # Plain attributes live in __dict__: nn.Module.__setattr__ would register the DDP instance as a child.
        self.__dict__.update(_device_ids=device_ids, _options=ddp_options, _hooks=[], _ddp=None, _grad_sync=True,
                             _sync_buffers=bool(sync_buffers) and group.world_size() > 1, _probe=not decided,
                             _decided=decided, _eval_backward=False)  # _rebuild() sets the rest
        self._drop_in()
        if group.rank() != 0:  # torch's hint about the flag, once per job rather than once per rank
            warnings.filterwarnings("ignore", message=_UNUSED_WARNING)
        self._rebuild()
        if not _live:  # registered after the process group's own exit hook, so it runs before it
            atexit.register(_release_reducers)
        _live.add(self)

    def __getattr__(self, name: str) -> Any:
        if name == "_ddp_params_and_buffers_to_ignore":  # DistributedDataParallel(ap.wrap(model)) asks this first
            raise UsageError("this model is already distributed by autoparallel.wrap, and a second "
                             "DistributedDataParallel would all-reduce every gradient twice: remove the "
                             "DistributedDataParallel(...) line (ap.wrap's options take DDP's arguments)")
        return super().__getattr__(name)

    def _rebuild(self) -> None:
        """(Re)create DDP for the parameters that require grad now: a collective on every rank."""
        if self._ddp is not None:  # free the old reducer (its gradient buffer and hooks) first
            self.__dict__["_ddp"] = None
            gc.collect()
        params = list(self.module.parameters())
        ddp = None
        if any(p.requires_grad for p in params):  # DDP refuses a module with nothing to train
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                ddp = DistributedDataParallel(self.module, device_ids=self._device_ids, **self._options)
            ddp.broadcast_buffers = False  # ours: after the forward, see _broadcast_buffers
            for state, hook in self._hooks:
                ddp.register_comm_hook(state, hook)
        self.__dict__.update(_ddp=ddp, _params=params, _flags=tuple(p.requires_grad for p in params),
                             _generation=structure_generation())

    def _changed(self) -> bool:
        if self._generation != structure_generation():  # a parameter or submodule was registered somewhere
            self.__dict__["_generation"] = structure_generation()
            if tuple(map(id, self.module.parameters())) != tuple(map(id, self._params)):  # _params keeps them alive
                return True
        return tuple(p.requires_grad for p in self._params) != self._flags

    def _broadcast_buffers(self) -> None:
        """Rank 0's buffers to every rank, one broadcast per (device, dtype), written through ``.data``: autograd
        saved some for the coming backward (BatchNorm its running statistics, unread in training mode), and a
        tracked in-place copy would make that backward refuse to run."""
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for buffer in self.module.buffers():
            groups.setdefault((buffer.device, buffer.dtype), []).append(buffer)
        with torch.no_grad():
            for buffers in groups.values():
                flat = torch.cat([b.reshape(-1) for b in buffers])  # a copy, never a view of a single buffer
                with group.explained("the broadcast of rank 0's buffers after a training forward"):
                    dist.broadcast(flat, src=0)
                for buffer, synced in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
                    buffer.data.copy_(synced)

    def _probed_forward(self, args: tuple, kwargs: dict) -> Any:
        """The first training forward: find out whether DDP needs ``find_unused_parameters``."""
        cuda = self._device_ids[0] if self._device_ids else None
        rng = (torch.get_rng_state(), None if cuda is None else torch.cuda.get_rng_state(cuda))
        buffers = [b.detach().clone() for b in self.module.buffers()]
        output = self._ddp(*args, **kwargs)
        unused, reentrant = _graph_facts(output, self._params)
        flags = torch.tensor([float(unused), float(reentrant)], device=group.comm_device())
        with group.explained("the first training step's agreement on unused parameters"):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank must decide alike
        self.__dict__["_probe"] = False
        if not flags[0] or flags[1]:  # all used, or reentrant checkpoints (which need False): keep False
            return output
        del output  # run it again under find_unused_parameters=True, from the same random state and buffers
        with torch.no_grad():
            for saved, buffer in zip(buffers, self.module.buffers()):
                buffer.copy_(saved)
        torch.set_rng_state(rng[0])
        if cuda is not None:
            torch.cuda.set_rng_state(rng[1], cuda)
        logger.info("DDP: some parameters took no part in the first step: find_unused_parameters=True")
        warnings.filterwarnings("ignore", message=_UNUSED_WARNING)  # right by construction
        self._options["find_unused_parameters"] = True
        self._rebuild()
        return self._ddp(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or not self.training:
            output = self.module(*args, **kwargs)
            tracked = next((t for t in tensors(output) if t.requires_grad), None) if torch.is_grad_enabled() else None
            if tracked is not None:  # an optimizer step on these unsynchronised gradients is refused
                tracked.register_hook(lambda grad: self.__dict__.update(_eval_backward=True))
            return output
        self.__dict__["_eval_backward"] = False
        if self._changed():
            logger.info("the model's trainable parameters changed since DDP was built: rebuilding it")
            if not self._decided:  # the new set of trainable parameters gets its own first-step choice
                self._options.pop("find_unused_parameters", None)
                self.__dict__["_probe"] = True
            self._rebuild()
        if self._ddp is None:
            return self.module(*args, **kwargs)
        self._ddp.require_backward_grad_sync = self._grad_sync
        try:
            output = self._probed_forward(args, kwargs) if self._probe else self._ddp(*args, **kwargs)
        except RuntimeError as error:
            if "Expected to have finished reduction in the prior iteration" not in str(error):
                raise
            why = ("with the DDP options given to ap.wrap()" if self._decided else "although every parameter took "
                   "part in the first one (data-dependent routing such as a top-k mixture of experts?)")
            raise UsageError(f"a parameter got no gradient in the previous step, {why}: pass "
                             "find_unused_parameters=True to ap.wrap()") from error
        if self._sync_buffers:
            self._broadcast_buffers()
        return output

    def register_comm_hook(self, state: Any, hook: Any) -> None:
        """DDP's communication hook (fp16 compression, PowerSGD, ...), kept across rebuilds of DDP."""
        self._hooks.append((state, hook))
        if self._ddp is not None:
            self._ddp.register_comm_hook(state, hook)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally for the backward passes inside (applied at each forward, so it survives a
        DDP rebuild inside an accumulation window)."""
        previous = self._grad_sync
        self.__dict__["_grad_sync"] = False
        try:
            yield
        finally:
            self.__dict__["_grad_sync"] = previous

"""The Mosaic GPU kernels on a CPU: JAX's GPU interpret mode, completed.

jax 0.11's Pallas ships an interpreter for Mosaic GPU kernels
(`plgpu.InterpretGPUParams`): each warpgroup of a block runs as a CPU
thread over simulated global and shared memory, with mbarriers, TMA copies
and WGMMA modelled. It checks more than the hardware does (a thread that
skips a barrier phase is an error, not a hang), so a kernel that passes
here has its synchronisation as well as its arithmetic checked. Three
things the project's kernels use are missing from it; `enable()` adds
them, each the operation's documented meaning:

- `pl.run_state` over a WGMMA accumulator initialised from registers
  (`plgpu.ACC.init(acc)`, how the kernels add `p v` into the running
  output): the accumulator becomes a register allocation holding the
  initial value, the body runs, the final value is read back.
- WGMMA with its left operand in registers (`p` of the softmax): `acc +=
  a @ b` with `a` the value instead of a shared-memory buffer.
- A barrier freed while a thread has not observed its last completed
  phase: the consumers' final release of a stage that the producer never
  waits for again. The interpreter calls that an error; on the hardware
  it is the normal end of a pipeline. A thread two phases behind (a
  missed completion, which the hardware cannot tell from the next) still
  fails.

Flash's tests run its kernels op by op (eagerly): a forward + backward
under one `jax.jit` deadlocked on a 2-core machine (one warpgroup waiting
at a barrier, another never scheduled; most likely XLA's CPU thread pool,
held by the blocked warpgroups, not measured further). A jitted call with
one kernel (the decode tests) runs.

The fused backward's dQ needs two more, which the interpreter does not
model at all; `enable()` adds them too:

- global semaphores (`pl.get_global`, `plgpu.semaphore_wait` /
  `semaphore_signal`): counts shared by every program of a launch, zeroed
  when a kernel starts; a wait blocks until its count is reached (and
  decrements it when asked). The interpreter runs a grid's programs one
  after another, in grid order, so a program may only wait for earlier
  ones (the fused backward's key-tile axis is its slowest: it does);
- a TMA store with `reduction_op="add"`: the tile added into global
  memory under a lock, complete when issued (so a missing
  `wait_smem_to_gmem` before reusing the tile goes unnoticed there).

Only the Mosaic GPU kernels run here; Triton kernels keep Pallas'
`interpret=True`.

A kernel of four warpgroups (branch work: a dQ writer warpgroup) once
hung here in 8 of 13 runs on a 2-core machine, one warpgroup not having
run its first operation; later runs with this harness (22, some with
three test processes on the 2 cores) did not hang. The cause was not
found (benchmarks/flash_notes.md).
"""

import contextlib
import functools
import itertools
import threading

import jax
import numpy as np

try:  # jax >= 0.11; jax 0.10's interpreter lacks refs in `plgpu.load`.
  from jax._src import callback
  from jax._src import core as jax_core
  from jax._src import linear_util
  from jax._src import tree_util
  from jax._src.pallas import primitives as pallas_primitives
  from jax._src.pallas.mosaic_gpu import primitives as mgpu_primitives
  from jax._src.pallas.mosaic_gpu import core as mgpu_core
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
  from jax._src.pallas.mosaic_gpu.interpret import shared_memory
  from jax._src.state import discharge
  from jax._src.state import types as state_types
  from jax.experimental.pallas import mosaic_gpu as plgpu
  _PARAMS = plgpu.InterpretGPUParams
  UNAVAILABLE = None
except (ImportError, AttributeError) as e:
  UNAVAILABLE = f"JAX's Mosaic GPU interpret mode needs jax >= 0.11 ({e})"
if UNAVAILABLE is None and jax.default_backend() != "cpu":
  UNAVAILABLE = "runs on a CPU (the compiled kernels' tests run here)"


def _run_state(interpreter, eqn, token, invals):
  """`run_state` over register accumulators (see the module docstring)."""
  jaxpr = eqn.params["jaxpr"]
  if not all(eqn.params["is_initialized"]):
    raise NotImplementedError("run_state with uninitialised refs")
  regs = shared_memory.get_memory_space_idx(mgpu_core.MemorySpace.REGS)
  args, keys = [], []
  for value, out in zip(invals, eqn.outvars):
    if isinstance(out.aval, state_types.AbstractRef):  # A ref closed over.
      args.append(value)
      keys.append(None)
      continue
    token, request = gpu_callbacks.call_make_allocation_request_array(
        token=token, compute_unit=interpreter.thread, memory_space_id=regs)
    token, key = gpu_callbacks.call_allocate_buffer(
        token, interpreter.mesh_location, interpreter.thread, request, value,
        eqn.source_info)
    args.append(key)
    keys.append(key)
  token, _ = interpreter.interpret(jaxpr, token, *args)
  outs = []
  for value, key, out in zip(invals, keys, eqn.outvars):
    if key is None:
      outs.append(value)
      continue
    token, final = gpu_callbacks.call_get(
        token=token, result_shape_and_dtype=out.aval,
        mesh_location=interpreter.mesh_location, thread=interpreter.thread,
        allocation_key_as_array=key, transforms=(),
        source_info=eqn.source_info)
    token = gpu_callbacks.call_deallocate_buffer(
        token, interpreter.mesh_location, interpreter.thread, key,
        eqn.source_info)
    outs.append(final)
  return token, outs


class _Semaphores:
  """The global semaphores (`pl.get_global`) of the kernel being run: each
  `get_global` a handle, each of its entries a count, zeroed when a kernel
  starts (as the hardware's are at each launch)."""

  def __init__(self):
    self.cv = threading.Condition()
    self.counts = {}
    self.handles = itertools.count()

  def reset(self):
    with self.cv:
      self.counts.clear()

  def wait(self, token, handle, index, value, *, decrement: bool):
    key = (int(handle), int(index))
    with self.cv:
      if not self.cv.wait_for(lambda: self.counts.get(key, 0) >= int(value),
                              timeout=_WAIT_S):
        raise RuntimeError(
            f"semaphore {key} waited {_WAIT_S} s for {int(value)} at "
            f"{self.counts.get(key, 0)}: a program waits for a later one, "
            "or for a signal that never comes")
      if decrement:
        self.counts[key] -= int(value)
    return token

  def signal(self, token, handle, index, inc):
    key = (int(handle), int(index))
    with self.cv:
      self.counts[key] = self.counts.get(key, 0) + int(inc)
      self.cv.notify_all()
    return token


_SEMAPHORES = _Semaphores()
_WAIT_S = 300  # A semaphore wait longer than this is a deadlock here.


def _semaphore_entry(ref, transforms):
  """`(handle, flat index)` of `sems.at[i]` (one integer index)."""
  index = 0
  for t in transforms:
    (i,) = t.indices  # One-dimensional semaphore arrays only.
    if not hasattr(i, "dtype") and not isinstance(i, int):
      raise NotImplementedError(f"semaphore index {i}")
    index = index + i
  return ref, index


def _semaphore_op(eqn, token, invals):
  """`semaphore_wait` / `semaphore_signal` on a global semaphore."""
  args = tree_util.tree_unflatten(eqn.params["args_tree"], invals)
  token_type = gpu_callbacks.TOKEN_SHAPE_DTYPE
  if eqn.primitive is mgpu_primitives.semaphore_wait_p:
    ref, transforms, value, decrement = args
    handle, index = _semaphore_entry(ref, transforms)
    return callback.io_callback(
        functools.partial(_SEMAPHORES.wait, decrement=bool(decrement)),
        token_type, token, handle, index, value, ordered=False), []
  ref, transforms, inc, device_id, _ = args
  if device_id is not None:
    raise NotImplementedError("semaphore_signal to another device")
  handle, index = _semaphore_entry(ref, transforms)
  return callback.io_callback(_SEMAPHORES.signal, token_type, token, handle,
                              index, inc, ordered=False), []


def _handled(eqn) -> bool:
  return eqn.primitive in (discharge.run_state_p,
                           pallas_primitives.get_global_p,
                           mgpu_primitives.semaphore_wait_p,
                           mgpu_primitives.semaphore_signal_p)


def _segments(jaxpr):
  """Splits `jaxpr`'s equations at those handled here (`_handled`): yields
  each of those, and each run of others as a sub-jaxpr with the variables
  it reads from before and those read after it."""
  eqns, start = jaxpr.eqns, 0
  while start < len(eqns):
    if _handled(eqns[start]):
      yield eqns[start]
      start += 1
      continue
    end = start
    while end < len(eqns) and not _handled(eqns[end]):
      end += 1
    run = eqns[start:end]
    made = {v for e in run for v in e.outvars}
    reads = list(dict.fromkeys(
        a for e in run for a in e.invars
        if isinstance(a, jax_core.Var) and a not in made))
    later = {a for e in eqns[end:] for a in e.invars
             if isinstance(a, jax_core.Var)}
    later |= {a for a in jaxpr.outvars if isinstance(a, jax_core.Var)}
    writes = [v for e in run for v in e.outvars if v in later]
    yield jax_core.Jaxpr(
        [], reads, writes, run,
        jax_core.join_effects(*(e.effects for e in run)),
        debug_info=linear_util.DebugInfo("gpu_interpret", "a run_state's "
                                         "neighbours", None, None))
    start = end


def _interpret(self, original, jaxpr, token, *args):
  if not any(map(_handled, jaxpr.eqns)):
    return original(self, jaxpr, token, *args)
  env = dict(zip(jaxpr.constvars + jaxpr.invars, args))
  read = lambda a: a.val if isinstance(a, jax_core.Literal) else env[a]
  for part in _segments(jaxpr):
    if isinstance(part, jax_core.JaxprEqn):
      invals = [read(a) for a in part.invars]
      if part.primitive is discharge.run_state_p:
        token, outs = _run_state(self, part, token, invals)
      elif part.primitive is pallas_primitives.get_global_p:
        outs = [np.int32(next(_SEMAPHORES.handles))]
      else:
        token, outs = _semaphore_op(part, token, invals)
      env.update(zip(part.outvars, outs))
    else:
      token, outs = original(self, part, token, *map(read, part.invars))
      env.update(zip(part.outvars, outs))
  return token, [read(a) for a in jaxpr.outvars]


def _wgmma(original, *, token, mesh_location, thread,
           acc_allocation_key_as_array, acc_transforms,
           a_allocation_key_as_array, a_transforms, b_allocation_key_as_array,
           b_transforms, source_info=None):
  """WGMMA with the left operand in registers (see the module docstring)."""
  key_shape = gpu_callbacks.HostAllocationKey.shape_and_dtype().shape
  if np.shape(a_allocation_key_as_array) == tuple(key_shape):
    return original(
        token=token, mesh_location=mesh_location, thread=thread,
        acc_allocation_key_as_array=acc_allocation_key_as_array,
        acc_transforms=acc_transforms,
        a_allocation_key_as_array=a_allocation_key_as_array,
        a_transforms=a_transforms,
        b_allocation_key_as_array=b_allocation_key_as_array,
        b_transforms=b_transforms, source_info=source_info)
  memory = gpu_callbacks._get_shared_memory()  # pylint: disable=protected-access
  info = shared_memory.GPULoggingInfo(mesh_location, thread, source_info)
  plain = lambda t: jax.tree.map(
      int, gpu_callbacks._remove_noop_transforms(t))  # pylint: disable=protected-access

  def region(key_array, transforms):
    key = gpu_callbacks.HostAllocationKey.from_array(key_array)
    return key, memory.access(key, plain(transforms))

  b_key, b_range = region(b_allocation_key_as_array, b_transforms)
  b, _, _ = memory.get_buffer_content(b_key, b_range, thread,
                                      logging_info=info)
  acc_key, acc_range = region(acc_allocation_key_as_array, acc_transforms)
  acc, _, _ = memory.get_buffer_content(acc_key, acc_range, thread,
                                        logging_info=info)
  acc = acc + np.matmul(np.asarray(a_allocation_key_as_array), b,
                        dtype=acc.dtype)
  memory.store_buffer_content(acc_key, acc_range, acc, thread,
                              logging_info=info)
  return token


_REDUCE = threading.Lock()


def _copy_smem_to_gmem(original, *, reduction_op=None, **kwargs):
  """A TMA store with `reduction_op="add"`: the shared-memory tile added
  into global memory, atomically (done when issued)."""
  if reduction_op is None:
    return original(reduction_op=None, **kwargs)
  if reduction_op != "add" or kwargs["predicate"] is not None:
    raise NotImplementedError(f"TMA reduction {reduction_op!r}")
  memory = gpu_callbacks._get_shared_memory()  # pylint: disable=protected-access
  thread = kwargs["thread"]
  info = shared_memory.GPULoggingInfo(kwargs["mesh_location"], thread,
                                      kwargs["source_info"])
  plain = lambda t: jax.tree.map(
      int, gpu_callbacks._remove_noop_transforms(t))  # pylint: disable=protected-access

  def region(which):
    key = gpu_callbacks.HostAllocationKey.from_array(
        kwargs[f"{which}_allocation_key_as_array"])
    return key, memory.access(key, plain(kwargs[f"{which}_transforms"]))

  (src, src_range), (dst, dst_range) = region("src"), region("dst")
  with _REDUCE:
    x, _, _ = memory.get_buffer_content(src, src_range, thread,
                                        logging_info=info)
    y, _, _ = memory.get_buffer_content(dst, dst_range, thread,
                                        logging_info=info)
    memory.store_buffer_content(dst, dst_range, y + x.astype(y.dtype),
                                thread, logging_info=info)
  return kwargs["token"]


def _initialize(original, **kwargs):
  _SEMAPHORES.reset()
  return original(**kwargs)


def _deallocate(self):
  """`Barrier.deallocate`, its last phase allowed to go unobserved."""
  with self.cv:
    self.ref_count -= 1
    if self.ref_count > 0:
      return
    if self.arrivals_count:
      raise ValueError(f"barrier {id(self)} freed with "
                       f"{self.arrivals_count} arrivals pending")
    for thread, seen in self.last_observed_phase_by_thread.items():
      if seen < self.phase - 1:
        raise ValueError(f"barrier {id(self)} freed at phase {self.phase}; "
                         f"{thread} last observed {seen - 1}")


@functools.cache
def enable():
  """Adds what the interpreter lacks (idempotent; jax >= 0.11 only)."""
  if UNAVAILABLE:
    raise RuntimeError(UNAVAILABLE)
  cls = jaxpr_interpret.JaxprInterpreter
  cls.interpret = functools.partialmethod(_interpret, cls.interpret)
  gpu_callbacks.wgmma = functools.partial(_wgmma, gpu_callbacks.wgmma)
  gpu_callbacks.copy_smem_to_gmem = functools.partial(
      _copy_smem_to_gmem, gpu_callbacks.copy_smem_to_gmem)
  gpu_callbacks._initialize_shared_memory = functools.partial(  # pylint: disable=protected-access
      _initialize, gpu_callbacks._initialize_shared_memory)  # pylint: disable=protected-access
  shared_memory.Barrier.deallocate = _deallocate


@contextlib.contextmanager
def mosaic_on_cpu():
  """Runs every Mosaic GPU kernel traced inside under the interpreter."""
  enable()
  with plgpu.force_gpu_interpret_mode(_PARAMS()):
    yield

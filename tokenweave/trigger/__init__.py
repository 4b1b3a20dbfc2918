"""T3-style track-and-trigger: overlap a row-parallel GEMM with its all-reduce (+ residual + RMSNorm).

The consumer is the core's fused two-shot kernel (or the ordinary fused op, per row group) on a
high-priority stream; the producer computes ``y = x @ w.T`` on the compute stream and reports progress in
per-chunk counters of a :class:`Tracker`. Two producers (:mod:`.producers`: ``cublas``, ``triton``) and three
consumers (:mod:`.consumers`: ``sm``, ``copy_engine``, ``stream``), any pairing. The SM and copy-engine
consumers spin on their CTAs for the whole GEMM, which costs the GEMM those SMs; the stream consumer's
kernels take SMs only as the GEMM's CTAs retire (the high-priority stream's CTAs are scheduled first).

Layout of the package:

``policy``     which path a call takes (sequential or overlapped, producer, consumer), from the per-card
               tuning data (:func:`tokenweave.tuning.trigger_config`); nothing measured lives in code
``tracker``    :class:`Tracker`
``plan``       :class:`TriggerPlan`: one call's launch plan, built once (:func:`plan_call`) and handed to
``producers``  the cuBLAS (+ mark_ready) and Triton producers
``consumers``  the sm / copy_engine / stream schedules
``api``        :func:`matmul_allreduce_rmsnorm`, :func:`matmul_allreduce`

SM partitions (``sm_partition=``, :mod:`tokenweave.partition`): the producer runs on the partition's GEMM
stream (its SMs minus the communication ones) and the consumer (its kernel, or the stream consumer's gated
calls) on the communication stream, with at most as many CTAs as that partition has SMs, so it never waits
for GEMM CTAs to retire and never takes SMs from the GEMM. The copy engines' stage keeps its own stream.
Both streams fork from the caller's stream and join back before the call returns.

Counters of the SM consumer only grow (the kernel keeps its own ``consumed`` count), so CUDA-graph
replays need no reset; the stream waits (copy engine, stream) compare with constants captured in the graph,
so their group counters are re-armed to 0 by the waiting stream after each wait.

Forward progress: the consumer spins on at most half the SMs (each of its CTAs fills an SM: 512 threads
x 128 registers) and the Triton producer's persistent grid is capped to the SMs left over, so the
producer always runs; the producer never waits for the consumer. One more hazard: CUDA's lazy module
loading may synchronise the context when a kernel is first launched; if that kernel is the producer and
the consumer already spins, that is a deadlock (seen on the GPU: every rank timed out on chunk 0). The
first call of each shape on a Tracker therefore runs the producer before launching the consumer (no
overlap, same result), which loads every kernel the overlapped calls use; CUDA-graph capture launches
nothing and needs no such call.
"""
from tokenweave.trigger.policy import CONSUMERS, MAX_GROUPS, MODES, PRODUCERS, Choice, choose, stream_groups
from tokenweave.trigger.tracker import Tracker
from tokenweave.trigger.producers import sm_carveout
from tokenweave.trigger.plan import ProducerGroup, TriggerCall, TriggerPlan, plan_call, producer_groups
from tokenweave.trigger.api import matmul_allreduce, matmul_allreduce_rmsnorm

__all__ = ["CONSUMERS", "MAX_GROUPS", "MODES", "PRODUCERS", "Choice", "ProducerGroup", "Tracker", "TriggerCall",
           "TriggerPlan", "choose", "matmul_allreduce", "matmul_allreduce_rmsnorm", "plan_call", "producer_groups",
           "sm_carveout", "stream_groups"]

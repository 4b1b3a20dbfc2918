// The one binding file: TORCH_LIBRARY schemas + CUDA impls of the ops, and the pybind11 helpers
// that Communicator uses to register its device state. Every check names its op.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "tokenweave/tokenweave.h"

namespace tw = tokenweave;

namespace {

std::string num(int64_t v) { return std::to_string(v); }

std::string shape(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

std::string dev(const at::Device& d) { return d.str(); }

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

struct CommEntry {
  tw::CommDevice dev;
  tw::Transport transport;
  int device;  // CUDA device index the workspace lives on
};

// A symmetric tensor allocation registered with a communicator (Communicator.empty): this rank's range
// and every rank's base address, for the lean algorithm's destinations.
struct SymAlloc {
  uintptr_t base;
  uint64_t bytes;
  std::vector<int64_t> peers;
  int64_t mc;
  int64_t index;  // registration order: the same on every rank that allocates in the same order
};

std::mutex g_mu;
std::unordered_map<int64_t, CommEntry> g_comms;
std::unordered_map<int64_t, std::vector<SymAlloc>> g_allocs;  // by communicator id
int64_t g_next_id = 1;

CommEntry lookup(int64_t id, const char* op) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_comms.find(id);
  TORCH_CHECK(it != g_comms.end(), op, ": communicator ", num(id), " is closed or was never created");
  return it->second;
}

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// Every rank's address of `t` (which must lie in one registered symmetric allocation of `comm`). `why` says
// which algorithm needs it there and for what ("algo 'lean' writes out on every rank").
tw::PeerTable peer_table(int64_t comm, const at::Tensor& t, int world, const char* op, const char* name,
                         const char* why) {
  std::lock_guard<std::mutex> lock(g_mu);
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uint64_t nbytes = uint64_t(t.numel()) * t.element_size();
  for (const SymAlloc& a : g_allocs[comm]) {
    if (p < a.base || p + nbytes > a.base + a.bytes) continue;
    const uint64_t off = p - a.base;
    tw::PeerTable pt{};
    for (int q = 0; q < world; ++q) pt.ptr[q] = reinterpret_cast<char*>(a.peers[q] + int64_t(off));
    pt.mc = a.mc ? reinterpret_cast<char*>(a.mc + int64_t(off)) : nullptr;
    pt.ident = (uint64_t(a.index + 1) << 40) ^ off;
    return pt;
  }
  TORCH_CHECK_VALUE(false, op, ": ", why, ", so ", name,
                    " must live in the communicator's symmetric memory: allocate it with comm.empty(...)");
  return {};
}

tw::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return tw::DType::kBFloat16;
    case at::kHalf: return tw::DType::kFloat16;
    case at::kFloat: return tw::DType::kFloat32;
    default: TORCH_CHECK_TYPE(false, op, ": dtype ", dtype_name(t.scalar_type()), " is not supported; use bfloat16, float16 or float32");
  }
}

// TORCH_CHECK_TYPE / TORCH_CHECK_VALUE surface in Python as TypeError / ValueError, like the torch
// transport's checks; every message names the op and says what to change.
// Messages hold only text: numbers, shapes and devices go through num()/shape()/dev() below, never
// through an ostream of this extension. On the GPU image (torch 2.11, extension built by /opt/gcc) every
// check whose message streamed an integer or a shape killed the process with SIGSEGV, whatever its
// exception type, while text-only messages raised normally (bench/debug/validation_cases.py).
void check_rows(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", dev(t.device()), " but x is on ", dev(x.device()),
                    "; move it with .to('", dev(x.device()), "')");
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", dtype_name(t.scalar_type()), " but x has ",
                   dtype_name(x.scalar_type()), "; convert it with .to(", dtype_name(x.scalar_type()), ")");
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " has shape ", shape(t.sizes()), ", x has ", shape(x.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous; call .contiguous() on it");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
                    " must be 16-byte aligned (it is a view at an odd offset); pass a fresh tensor or .clone() it");
}

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
                  const at::Tensor& out, const char* op) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", dev(x.device()));
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) >= 1, op, ": x must be non-empty 2-D [tokens, hidden], got ", shape(x.sizes()));
  TORCH_CHECK_VALUE(x.size(1) % 8 == 0, op, ": hidden size (last dim of x) is ", num(x.size(1)),
                    "; it must be a multiple of 8 (16-byte vectors): pad the hidden dimension");
  dtype_of(x, op);
  check_rows(x, x, op, "x");
  check_rows(out, x, op, "out");
  if (residual) {
    check_rows(*residual, x, op, "residual");
    TORCH_CHECK_VALUE(residual->data_ptr() != out.data_ptr(), op, ": out must not be the residual tensor (both are written)");
  }
  if (weight) {
    TORCH_CHECK_TYPE(weight->scalar_type() == x.scalar_type(), op, ": weight has dtype ", dtype_name(weight->scalar_type()),
                     " but x has ", dtype_name(x.scalar_type()), "; convert it with .to(", dtype_name(x.scalar_type()), ")");
    TORCH_CHECK_VALUE(weight->device() == x.device(), op, ": weight is on ", dev(weight->device()), " but x is on ", dev(x.device()));
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == x.size(1) && weight->is_contiguous(), op,
                      ": weight must be contiguous of shape [hidden] = [", num(x.size(1)), "], got ", shape(weight->sizes()));
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(weight->data_ptr()) % 16 == 0, op, ": weight must be 16-byte aligned");
  }
}

struct Tracking {
  int64_t chunk_rows = 0;             // > 0: the trigger plan's geometry (tracked and copy-engine feeds)
  const at::Tensor* ready = nullptr;  // Feed::kTracked
  at::Tensor* consumed = nullptr;
  int64_t pieces_full = 0, pieces_last = 0;
  at::Tensor* go = nullptr;  // Feed::kCopyEngine
};

void check_counters(std::initializer_list<const at::Tensor*> ts, const at::Tensor& x, int64_t n, const char* op) {
  for (const at::Tensor* t : ts)
    TORCH_CHECK_VALUE(t->is_cuda() && t->device() == x.device() && t->scalar_type() == at::kInt && t->is_contiguous() &&
                          t->numel() >= n,
                      op, ": tracker counters must be contiguous int32 CUDA tensors on x's device with >= ", num(n),
                      " entries (make them with tokenweave.Tracker)");
}

// The call as the kernel will see it: checks, then plan_allreduce.
tw::CallArgs plan_call(const char* op, const CommEntry& e, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                       const std::optional<at::Tensor>& weight, const at::Tensor& out, double eps, int64_t algo,
                       int64_t ctas, int64_t chunks_per_cta, tw::Feed feed, tw::CallArgs a = {},
                       int64_t chunk_rows = 0) {
  TORCH_CHECK_VALUE(x.device().index() == e.device, op, ": x is on ", dev(x.device()), " but the communicator's workspace is on cuda:",
                    num(e.device), "; call torch.cuda.set_device before creating the Communicator, or move x");
  a.x = x.data_ptr();
  a.out = out.data_ptr();
  a.residual = residual ? residual->data_ptr() : nullptr;
  a.weight = weight ? weight->data_ptr() : nullptr;
  a.tokens = x.size(0);
  a.hidden = int(x.size(1));
  a.eps = float(eps);
  a.algo = int(algo);
  a.dtype = int(dtype_of(x, op));
  a.op |= (residual ? tw::kOpResidual : 0u) | (weight ? tw::kOpNorm : 0u);
  a.feed = int(feed);
  TORCH_CHECK_TYPE(feed == tw::Feed::kResident || a.dtype != int(tw::DType::kFloat32), op,
                   ": track-and-trigger takes bfloat16 or float16");
  TORCH_CHECK_VALUE(feed != tw::Feed::kCopyEngine || e.transport == tw::Transport::kP2P, op,
                    ": the copy-engine feed needs the p2p transport; use the SM consumer");
  TORCH_CHECK_VALUE(chunk_rows >= 0 && chunk_rows <= x.size(0), op, ": chunk_rows must be in [1, tokens] (0: plan here)");
  const char* err = tw::plan_allreduce(a, e.dev.layout, int(ctas), int(chunks_per_cta), int(chunk_rows));
  TORCH_CHECK_VALUE(err == nullptr, op, ": ", err);
  return a;
}

void launch_collective(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                       const std::optional<at::Tensor>& weight, at::Tensor& out, double eps, int64_t comm, int64_t algo,
                       int64_t ctas, int64_t chunks_per_cta, const Tracking& track) {
  check_inputs(x, residual, weight, out, op);
  const CommEntry e = lookup(comm, op);
  const tw::Feed feed = track.ready ? tw::Feed::kTracked : track.go ? tw::Feed::kCopyEngine : tw::Feed::kResident;
  tw::CallArgs a = plan_call(op, e, x, residual, weight, out, eps, algo, ctas, chunks_per_cta, feed, {}, track.chunk_rows);
  if (track.ready) {
    check_counters({track.ready, track.consumed}, x, a.n_chunks, op);
    TORCH_CHECK_VALUE(track.pieces_full >= 1 && track.pieces_last >= 1, op, ": pieces per chunk must be >= 1");
    a.ready = reinterpret_cast<const uint32_t*>(track.ready->data_ptr());
    a.consumed = reinterpret_cast<uint32_t*>(track.consumed->data_ptr());
    a.pieces_full = uint32_t(track.pieces_full);
    a.pieces_last = uint32_t(track.pieces_last);
  }
  if (track.go) {
    check_counters({track.go}, x, 1, op);
    a.go = reinterpret_cast<uint32_t*>(track.go->data_ptr());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t st = tw::allreduce(e.dev, a, e.transport, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(st));
}

void allreduce_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
                    at::Tensor& out, double eps, int64_t comm, int64_t algo, int64_t ctas, int64_t chunks_per_cta) {
  launch_collective("tokenweave.allreduce", x, residual, weight, out, eps, comm, algo, ctas, chunks_per_cta, Tracking{});
}

// A sharded residual holds only this rank's rows [rank * shard_rows, ...) (lean, lamport_two_shot).
void check_sharded_residual(const at::Tensor& x, const at::Tensor& residual, const CommEntry& e, const char* op) {
  const int64_t shard = (x.size(0) + e.dev.world - 1) / e.dev.world;
  const int64_t mine = std::max<int64_t>(0, std::min<int64_t>(shard, x.size(0) - e.dev.rank * shard));
  TORCH_CHECK_VALUE(residual.dim() == 2 && residual.size(0) == mine && residual.size(1) == x.size(1), op,
                    ": a sharded residual holds this rank's rows only: shape [", num(mine), ", ", num(x.size(1)),
                    "], got ", shape(residual.sizes()), " (comm.shard_rows(tokens) gives the range)");
  TORCH_CHECK_TYPE(residual.scalar_type() == x.scalar_type(), op, ": residual has dtype ",
                   dtype_name(residual.scalar_type()), " but x has ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(residual.device() == x.device() && residual.is_contiguous() &&
                        reinterpret_cast<uintptr_t>(residual.data_ptr()) % 16 == 0,
                    op, ": residual must be a contiguous, 16-byte aligned tensor on x's device");
}

// A sharded residual with an algorithm whose destinations are this rank's own (lamport_two_shot: out is
// written locally, so it needs no symmetric memory; lean's sharded calls go through allreduce_lean).
void allreduce_sharded_cuda(const at::Tensor& x, at::Tensor& residual, const std::optional<at::Tensor>& weight,
                            at::Tensor& out, double eps, int64_t comm, int64_t algo, int64_t ctas,
                            int64_t chunks_per_cta) {
  constexpr const char* op = "tokenweave.allreduce_sharded";
  TORCH_CHECK_VALUE(algo == int64_t(tw::Algo::kLamportTwoShot), op,
                    ": takes algo lamport_two_shot (a sharded lean call goes through tokenweave.allreduce_lean)");
  check_inputs(x, std::nullopt, weight, out, op);
  const CommEntry e = lookup(comm, op);
  check_sharded_residual(x, residual, e, op);
  TORCH_CHECK_VALUE(residual.numel() == 0 || residual.data_ptr() != out.data_ptr(), op,
                    ": out must not be the residual tensor (both are written)");
  tw::CallArgs a{};
  a.op = tw::kOpShardedResidual;
  const tw::CallArgs planned = plan_call(op, e, x, residual, weight, out, eps, algo, ctas, chunks_per_cta,
                                         tw::Feed::kResident, a);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t st = tw::allreduce(e.dev, planned, e.transport, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(st));
}

// Lean two-shot (algo lean, lean_bulk or lean_pull): out (and a replicated residual) in the communicator's
// symmetric memory, and x too for lean_pull; a sharded residual holds only this rank's rows [rank * shard_rows, ...).
void allreduce_lean_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& weight, at::Tensor& out, double eps, int64_t comm, int64_t algo,
                         int64_t ctas, int64_t chunks_per_cta, bool sharded_residual) {
  constexpr const char* op = "tokenweave.allreduce_lean";
  const bool pull = algo == int64_t(tw::Algo::kLeanPull);
  TORCH_CHECK_VALUE(algo == int64_t(tw::Algo::kLean) || algo == int64_t(tw::Algo::kLeanBulk) || pull, op,
                    ": takes algo lean, lean_bulk or lean_pull (other algorithms go through tokenweave.allreduce)");
  check_inputs(x, sharded_residual ? std::nullopt : residual, weight, out, op);
  const CommEntry e = lookup(comm, op);
  TORCH_CHECK_VALUE(!sharded_residual || residual, op, ": sharded_residual needs a residual");
  if (sharded_residual) check_sharded_residual(x, *residual, e, op);
  tw::CallArgs a{};
  a.out_peers = peer_table(comm, out, e.dev.world, op, "out", "algo 'lean' writes out on every rank");
  if (residual && !sharded_residual)
    a.res_peers = peer_table(comm, *residual, e.dev.world, op, "residual",
                             "algo 'lean' with a replicated residual writes it on every rank");
  if (pull) a.x_peers = peer_table(comm, x, e.dev.world, op, "x", "algo 'lean_pull' reads x where it lies on every rank");
  if (sharded_residual) a.op = tw::kOpShardedResidual;
  tw::CallArgs planned = plan_call(op, e, x, residual, weight, out, eps, algo, ctas, chunks_per_cta,
                                   tw::Feed::kResident, a);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t st = tw::allreduce(e.dev, planned, e.transport, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(st));
}

void allreduce_tracked_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& weight, at::Tensor& out, double eps, int64_t comm,
                            int64_t algo, int64_t ctas, int64_t chunk_rows, const at::Tensor& ready,
                            at::Tensor& consumed, int64_t pieces_full, int64_t pieces_last) {
  TORCH_CHECK_VALUE(chunk_rows >= 1, "tokenweave.allreduce_tracked: chunk_rows must be >= 1 (the trigger plan's)");
  launch_collective("tokenweave.allreduce_tracked", x, residual, weight, out, eps, comm, algo, ctas, 1,
                    Tracking{chunk_rows, &ready, &consumed, pieces_full, pieces_last});
}

void allreduce_staged_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& weight, at::Tensor& out, double eps, int64_t comm,
                           int64_t ctas, int64_t chunk_rows, at::Tensor& go) {
  TORCH_CHECK_VALUE(chunk_rows >= 1, "tokenweave.allreduce_staged: chunk_rows must be >= 1 (the trigger plan's)");
  Tracking t;
  t.chunk_rows = chunk_rows;
  t.go = &go;
  launch_collective("tokenweave.allreduce_staged", x, residual, weight, out, eps, comm, int64_t(tw::Algo::kTwoShot),
                    ctas, 1, t);
}

void copy_engine_stage_cuda(const at::Tensor& x, int64_t comm, int64_t ctas, int64_t chunk_rows,
                            at::Tensor& group_ready, int64_t group_chunks, int64_t pieces_full, int64_t pieces_last,
                            at::Tensor& go, const at::Tensor& ones) {
  constexpr const char* op = "tokenweave.copy_engine_stage";
  check_inputs(x, std::nullopt, std::nullopt, x, op);
  const CommEntry e = lookup(comm, op);
  // The consumer's geometry, from the same trigger plan (the plan does not depend on residual/weight).
  TORCH_CHECK_VALUE(chunk_rows >= 1, op, ": chunk_rows must be >= 1 (the trigger plan's)");
  const tw::CallArgs a = plan_call(op, e, x, std::nullopt, std::nullopt, x, 0.0, int64_t(tw::Algo::kTwoShot), ctas, 1,
                                   tw::Feed::kCopyEngine, {}, chunk_rows);
  TORCH_CHECK_VALUE(group_chunks >= 1, op, ": group_chunks must be >= 1");
  check_counters({&group_ready}, x, (a.n_chunks + group_chunks - 1) / group_chunks, op);
  check_counters({&go}, x, 1, op);
  check_counters({&ones}, x, tw::kMaxChunks, op);
  TORCH_CHECK_VALUE(pieces_full >= 1 && pieces_last >= 1, op, ": pieces per group must be >= 1");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t st = tw::copy_engine_stage(
      e.dev, a, reinterpret_cast<const uint32_t*>(group_ready.data_ptr()), int(group_chunks), uint32_t(pieces_full),
      uint32_t(pieces_last), reinterpret_cast<uint32_t*>(go.data_ptr()),
      reinterpret_cast<const uint32_t*>(ones.data_ptr()), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == cudaSuccess, op, ": enqueue failed: ", cudaGetErrorString(st),
              st == cudaErrorNotSupported ? " (this driver lacks stream memory operations: use the SM consumer)" : "");
}

void mark_ready_cuda(at::Tensor& ready, int64_t begin, int64_t end, int64_t pieces) {
  constexpr const char* op = "tokenweave.mark_ready";
  TORCH_CHECK_VALUE(ready.is_cuda() && ready.scalar_type() == at::kInt && ready.is_contiguous() && end <= ready.numel(),
                    op, ": ready must be a contiguous int32 CUDA tensor covering chunks [begin, end)");
  const c10::cuda::CUDAGuard guard(ready.device());
  const cudaError_t st = tw::mark_ready(reinterpret_cast<uint32_t*>(ready.data_ptr()), int(begin), int(end),
                                        uint32_t(pieces), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(st), " (chunks must lie in [0, ",
              num(tw::kMaxChunks), "))");
}

void gate_on_counter_cuda(at::Tensor& counters, int64_t index, int64_t target) {
  constexpr const char* op = "tokenweave.gate_on_counter";
  TORCH_CHECK_VALUE(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.is_contiguous() &&
                        index >= 0 && index < counters.numel(),
                    op, ": counters must be a contiguous int32 CUDA tensor and index in [0, ", num(counters.numel()),
                    "); got index ", num(index));
  TORCH_CHECK_VALUE(target >= 1 && target < (int64_t(1) << 32), op, ": target must be in [1, 2^32); got ", num(target));
  const c10::cuda::CUDAGuard guard(counters.device());
  const cudaError_t st = tw::gate_on_counter(reinterpret_cast<uint32_t*>(counters.data_ptr()) + index,
                                             uint32_t(target), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == cudaSuccess, op, ": enqueue failed: ", cudaGetErrorString(st),
              st == cudaErrorNotSupported ? " (this driver lacks stream memory operations: use the SM consumer)" : "");
}

py::dict plan(int64_t comm, int64_t tokens, int64_t hidden, int64_t dtype, int64_t algo, int64_t ctas,
              int64_t chunks_per_cta) {
  constexpr const char* op = "tokenweave.plan";
  const CommEntry e = lookup(comm, op);
  tw::CallArgs a{};
  a.tokens = tokens;
  a.hidden = int(hidden);
  a.dtype = int(dtype);
  a.algo = int(algo);
  const char* err = tw::plan_allreduce(a, e.dev.layout, int(ctas), int(chunks_per_cta));
  TORCH_CHECK_VALUE(err == nullptr, op, ": ", err);
  py::dict d;
  d["ctas"] = a.ctas;
  d["chunk_rows"] = a.chunk_rows;
  d["n_chunks"] = a.n_chunks;
  d["shard_rows"] = a.shard_rows;
  return d;
}

// `shape`: the block shape (csrc/kernels/launch.cu kNormConfigs; 0 = the kernel's own pick), chosen by the
// Python dispatcher from the card's tuning config.
void add_rmsnorm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                      at::Tensor& out, double eps, int64_t shape) {
  constexpr const char* op = "tokenweave.add_rmsnorm";
  check_inputs(x, residual, weight, out, op);
  TORCH_CHECK_VALUE(shape >= 0 && shape < tw::add_rmsnorm_configs(), op, ": shape must be in [0, ",
                    num(tw::add_rmsnorm_configs()), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t st = tw::add_rmsnorm(x.data_ptr(), residual ? residual->data_ptr() : nullptr, weight.data_ptr(),
                                         out.data_ptr(), x.size(0), int(x.size(1)), float(eps), dtype_of(x, op),
                                         at::cuda::getCurrentCUDAStream(), int(shape));
  TORCH_CHECK(st == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(st),
              " (hidden must be a multiple of 8 and at most 32768, and fit the block shape: shape 0 always does)");
}

// Collective on the Python side (every rank registers the same allocations in the same order).
int64_t comm_register(int64_t comm, int64_t base, int64_t bytes, const std::vector<int64_t>& peers, int64_t mc) {
  constexpr const char* op = "tokenweave.Communicator.empty";
  const CommEntry e = lookup(comm, op);
  TORCH_CHECK(int64_t(peers.size()) == e.dev.world, op, ": need one address per rank");
  std::lock_guard<std::mutex> lock(g_mu);
  auto& v = g_allocs[comm];
  v.push_back(SymAlloc{uintptr_t(base), uint64_t(bytes), peers, mc, int64_t(v.size())});
  return int64_t(v.size()) - 1;
}

int64_t comm_create(int64_t device, int64_t rank, int64_t world, const std::vector<int64_t>& ws_ptrs, int64_t mc_ptr,
                    int64_t state_ptr, int64_t err_ptr, int64_t capacity_bytes, int64_t timeout_ns, int64_t transport) {
  constexpr const char* op = "tokenweave.Communicator";
  TORCH_CHECK(world >= 2 && world <= tw::kMaxWorld, op, ": world size ", num(world), " is outside 2..", num(tw::kMaxWorld));
  TORCH_CHECK(int64_t(ws_ptrs.size()) == world, op, ": need one workspace pointer per rank");
  TORCH_CHECK(rank >= 0 && rank < world, op, ": bad rank ", num(rank));
  if (transport == int64_t(tw::Transport::kMultimem)) {
    // Second line of defence behind Python's selection: never run multimem where multicast is off.
    TORCH_CHECK(mc_ptr != 0, op, ": multimem needs a multicast address");
    TORCH_CHECK(!env_is("NCCL_NVLS_ENABLE", "0") && !env_is("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1") &&
                    !env_is("NVSHMEM_DISABLE_NVLS", "1") && !env_is("TOKENWEAVE_DISABLE_MULTIMEM", "1"),
                op, ": multimem requested but multicast is disabled by the environment");
  }
  CommEntry e{};
  for (int i = 0; i < world; ++i) e.dev.ws[i] = reinterpret_cast<char*>(ws_ptrs[i]);
  e.dev.mc = reinterpret_cast<char*>(mc_ptr);
  e.dev.state = reinterpret_cast<tw::LocalState*>(state_ptr);
  e.dev.err = reinterpret_cast<tw::ErrorRecord*>(err_ptr);
  e.dev.layout = tw::make_layout(uint64_t(capacity_bytes), int(world));
  e.dev.timeout_ns = uint64_t(timeout_ns);
  e.dev.rank = int(rank);
  e.dev.world = int(world);
  e.transport = tw::Transport(transport);
  e.device = int(device);
  std::lock_guard<std::mutex> lock(g_mu);
  g_comms[g_next_id] = e;
  return g_next_id++;
}

void comm_destroy(int64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_comms.erase(id);
  g_allocs.erase(id);
}

py::dict layout(int64_t capacity_bytes, int64_t world) {
  const tw::Layout l = tw::make_layout(uint64_t(capacity_bytes), int(world));
  py::dict d;
  d["flags_off"] = l.flags_off;
  d["headers_off"] = l.headers_off;
  d["probe_off"] = l.probe_off;
  d["staged_off"] = l.staged_off;
  d["lamport_off"] = l.lamport_off;
  d["lamport_slot_bytes"] = l.lamport_slot_bytes;
  d["lamport_bytes"] = 3ull * tw::kLamportRegions * uint64_t(world) * l.lamport_slot_bytes;  // [buffer][region][src]
  d["lamport_max_bytes"] = tw::kLamportSlotBytes;
  d["data_off"] = l.data_off;
  d["slot_bytes"] = l.slot_bytes;
  d["gather_bytes"] = l.gather_bytes;
  d["half_bytes"] = l.half_bytes;
  d["total_bytes"] = l.total_bytes;
  d["capacity_bytes"] = l.capacity_bytes;
  d["one_shot_bytes"] = l.slot_bytes - uint64_t(tw::kMaxChunks) * 16 - 16;
  d["max_world"] = tw::kMaxWorld;
  d["block_threads"] = tw::kBlockThreads;
  return d;
}

void peer_probe(int64_t comm, int64_t magic, at::Tensor& result) {
  constexpr const char* op = "tokenweave.peer_probe";
  const CommEntry e = lookup(comm, op);
  TORCH_CHECK(result.is_cuda() && result.scalar_type() == at::kLong && result.numel() >= e.dev.world, op,
              ": result must be a CUDA int64 tensor of world size");
  const c10::cuda::CUDAGuard guard(result.device());
  const cudaError_t st = tw::peer_probe(e.dev, uint64_t(magic), reinterpret_cast<uint64_t*>(result.data_ptr()),
                                        at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(st));
}

}  // namespace

TORCH_LIBRARY(tokenweave, m) {
  m.def("allreduce(Tensor x, Tensor(a!)? residual, Tensor? weight, Tensor(b!) out, float eps, int comm, int algo, "
        "int ctas, int chunks_per_cta) -> ()");
  m.def("add_rmsnorm(Tensor x, Tensor(a!)? residual, Tensor weight, Tensor(b!) out, float eps, int shape=0) -> ()");
  m.def("allreduce_tracked(Tensor x, Tensor(a!)? residual, Tensor? weight, Tensor(b!) out, float eps, int comm, "
        "int algo, int ctas, int chunk_rows, Tensor ready, Tensor(c!) consumed, int pieces_full, "
        "int pieces_last) -> ()");
  m.def("mark_ready(Tensor(a!) ready, int begin, int end, int pieces) -> ()");
  m.def("allreduce_staged(Tensor x, Tensor(a!)? residual, Tensor? weight, Tensor(b!) out, float eps, int comm, "
        "int ctas, int chunk_rows, Tensor(c!) go) -> ()");
  m.def("copy_engine_stage(Tensor x, int comm, int ctas, int chunk_rows, Tensor(a!) group_ready, "
        "int group_chunks, int pieces_full, int pieces_last, Tensor(b!) go, Tensor ones) -> ()");
  m.def("gate_on_counter(Tensor(a!) counters, int index, int target) -> ()");
  m.def("allreduce_lean(Tensor x, Tensor(a!)? residual, Tensor? weight, Tensor(b!) out, float eps, int comm, "
        "int algo, int ctas, int chunks_per_cta, bool sharded_residual) -> ()");
  m.def("allreduce_sharded(Tensor x, Tensor(a!) residual, Tensor? weight, Tensor(b!) out, float eps, int comm, "
        "int algo, int ctas, int chunks_per_cta) -> ()");
}

TORCH_LIBRARY_IMPL(tokenweave, CUDA, m) {
  m.impl("allreduce", &allreduce_cuda);
  m.impl("add_rmsnorm", &add_rmsnorm_cuda);
  m.impl("allreduce_tracked", &allreduce_tracked_cuda);
  m.impl("mark_ready", &mark_ready_cuda);
  m.impl("allreduce_staged", &allreduce_staged_cuda);
  m.impl("copy_engine_stage", &copy_engine_stage_cuda);
  m.impl("gate_on_counter", &gate_on_counter_cuda);
  m.impl("allreduce_lean", &allreduce_lean_cuda);
  m.impl("allreduce_sharded", &allreduce_sharded_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tokenweave CUDA kernels (see tokenweave/ops.py for the public API)";
  m.def("comm_create", &comm_create);
  m.def("comm_destroy", &comm_destroy);
  m.def("layout", &layout);
  m.def("peer_probe", &peer_probe);
  m.def("plan", &plan);
  m.def("comm_register", &comm_register);
  m.def("add_rmsnorm_configs", &tw::add_rmsnorm_configs);
  // (shape, hidden, itemsize) -> threads per row, -1 where the shape cannot hold the row (tokenweave.tune)
  m.def("add_rmsnorm_row_group", [](int64_t shape, int64_t hidden, int64_t itemsize) {
    TORCH_CHECK_VALUE(itemsize == 2 || itemsize == 4, "tokenweave.add_rmsnorm_row_group: itemsize must be 2 or 4");
    return tw::add_rmsnorm_row_group(int(shape), int(hidden), itemsize == 2 ? tw::DType::kBFloat16 : tw::DType::kFloat32);
  });
  // Benchmarks only (tokenweave.bench.harness.clean_l2): L2 lines loaded with L2::evict_last (the compiled norm's
  // and the re-read norm shapes' hint) back to normal priority, so that no timed variant inherits another's.
  m.def("reset_persisting_l2_cache", []() {
    const cudaError_t e = cudaCtxResetPersistingL2Cache();
    TORCH_CHECK(e == cudaSuccess, "tokenweave.reset_persisting_l2_cache: ", cudaGetErrorString(e));
  });
  // Benchmarks only (tokenweave.bench.harness.CopyBandwidth): the card's copy bandwidth through SM loads and stores
  m.def("stream_copy", [](at::Tensor& dst, const at::Tensor& src) {
    constexpr const char* op = "tokenweave.stream_copy";
    TORCH_CHECK_VALUE(src.is_cuda() && dst.is_cuda() && src.device() == dst.device(), op,
                      ": src and dst must be CUDA tensors on one device");
    TORCH_CHECK_VALUE(src.is_contiguous() && dst.is_contiguous() && src.nbytes() == dst.nbytes(), op,
                      ": src and dst must be contiguous and of equal size; got ", num(src.nbytes()), " and ",
                      num(dst.nbytes()), " bytes");
    TORCH_CHECK_VALUE(src.nbytes() % 16 == 0 && reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(dst.data_ptr()) % 16 == 0,
                      op, ": sizes and addresses must be multiples of 16 bytes; got ", num(src.nbytes()), " bytes");
    const c10::cuda::CUDAGuard guard(src.device());
    const cudaError_t e = tw::stream_copy(src.data_ptr(), dst.data_ptr(), int64_t(src.nbytes()),
                                          at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(e == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(e));
  });
  // Benchmarks only: the current device's nominal memory bandwidth in GB/s (1e9 bytes), from its peak memory clock
  // (two transfers a clock) and bus width: the card's number beside the measured copy
  m.def("nominal_memory_gbps", []() {
    int dev = 0, clock_khz = 0, bus_bits = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev);
    TORCH_CHECK(e == cudaSuccess, "tokenweave.nominal_memory_gbps: ", cudaGetErrorString(e));
    return 2.0 * double(clock_khz) * 1e3 * double(bus_bits) / 8.0 / 1e9;
  });
  m.def("set_programmatic_launch", &tw::set_programmatic_launch);
  m.def("programmatic_launch", &tw::programmatic_launch);
  m.attr("STATE_WORDS") = int(sizeof(tw::LocalState) / 4);
  m.attr("BLOCK_THREADS") = tw::kBlockThreads;
  m.attr("MAX_WORLD") = tw::kMaxWorld;
  m.attr("MAX_CHUNKS") = tw::kMaxChunks;
  // Codes, sizes and offsets Python would otherwise re-declare (tokenweave/_abi.py reads these where the
  // extension is built; tests/cpu/test_abi.py checks its fallback values against them).
  py::dict algos, feeds, dtypes, transports, errors, op_bits, header;
  algos["one_shot"] = int(tw::Algo::kOneShot);
  algos["two_shot"] = int(tw::Algo::kTwoShot);
  algos["lamport"] = int(tw::Algo::kLamport);
  algos["lean"] = int(tw::Algo::kLean);
  algos["lamport_two_shot"] = int(tw::Algo::kLamportTwoShot);
  algos["lean_bulk"] = int(tw::Algo::kLeanBulk);
  algos["lean_pull"] = int(tw::Algo::kLeanPull);
  feeds["resident"] = int(tw::Feed::kResident);
  feeds["tracked"] = int(tw::Feed::kTracked);
  feeds["copy_engine"] = int(tw::Feed::kCopyEngine);
  dtypes["float32"] = int(tw::DType::kFloat32);
  dtypes["float16"] = int(tw::DType::kFloat16);
  dtypes["bfloat16"] = int(tw::DType::kBFloat16);
  transports["p2p"] = int(tw::Transport::kP2P);
  transports["multimem"] = int(tw::Transport::kMultimem);
  errors["timeout"] = int(tw::kErrTimeout);
  errors["mismatch"] = int(tw::kErrMismatch);
  errors["producer_timeout"] = int(tw::kErrProducerTimeout);
  op_bits["residual"] = int(tw::kOpResidual);
  op_bits["norm"] = int(tw::kOpNorm);
  op_bits["sharded_residual"] = int(tw::kOpShardedResidual);
  header["sig"] = int(offsetof(tw::CallHeader, sig));
  header["epoch"] = int(offsetof(tw::CallHeader, epoch));
  header["op"] = int(offsetof(tw::CallHeader, op));
  header["dtype"] = int(offsetof(tw::CallHeader, dtype));
  header["tokens"] = int(offsetof(tw::CallHeader, tokens));
  header["hidden"] = int(offsetof(tw::CallHeader, hidden));
  header["ctas"] = int(offsetof(tw::CallHeader, ctas));
  header["chunk_rows"] = int(offsetof(tw::CallHeader, chunk_rows));
  header["algo"] = int(offsetof(tw::CallHeader, algo));
  m.attr("ALGO_CODES") = algos;
  m.attr("FEED_CODES") = feeds;
  m.attr("DTYPE_CODES") = dtypes;
  m.attr("TRANSPORT_CODES") = transports;
  m.attr("ERROR_CODES") = errors;
  m.attr("OP_BITS") = op_bits;
  m.attr("CALL_HEADER_BYTES") = int(sizeof(tw::CallHeader));
  m.attr("CALL_HEADER_OFFSETS") = header;
  m.attr("ERROR_RECORD_BYTES") = int(sizeof(tw::ErrorRecord));
}

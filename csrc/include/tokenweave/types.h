// Shared constants, structs and the workspace layout: host-safe (the torch glue includes it too).
// static_asserts pin every struct that crosses the host/device or C++/Python boundary.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tokenweave {

// Largest tensor-parallel world the kernels are instantiated for: one HGX board's NVLink domain.
constexpr int kMaxWorld = 8;
// 512 threads = 16 warps per CTA: enough independent 16-byte accesses in flight per SM to cover NVLink
// latency (ANCHORS.md: remote writes from 512-thread CTAs saturate the link with about 8 CTAs).
constexpr int kBlockThreads = 512;
// Flags are [parity][phase][src][chunk] of uint64: 4096 chunks * 8 ranks * 2 * 2 * 8 B = 1 MiB per rank.
// 4096 chunks of one row each already covers the largest token count we pipeline per launch.
constexpr int kMaxChunks = 4096;
// Lamport one-shot: bytes of x one call takes (per slot). 2 MiB = 128 tokens x 8192 bf16, past where a
// one-shot (W-1 full copies per rank) can beat the two-shot (ANCHORS: one-shot loses from 512 KiB at TP4).
constexpr uint64_t kLamportSlotBytes = 2ull << 20;
// Regions of each Lamport buffer: S (pushed x) and G (the Lamport two-shot's reduced rows).
constexpr int kLamportRegionS = 0, kLamportRegionG = 1, kLamportRegions = 2;
// Vectors a thread keeps in registers for one row of the norm epilogue: 8 x 16 B = 32 registers.
// With at most 512 threads per row that bounds hidden at 512 * 8 * 8 = 32768 for 2-byte types.
constexpr int kMaxVecsPerThread = 8;
// Vectors per thread of a lean owner's rows: W slot loads each, so fewer than the other epilogues keep
// (4 x 16 B x 512 threads: hidden up to 16384 for 2-byte types, 8192 for float32).
constexpr int kLeanVecs = 4;

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class Transport : int { kP2P = 0, kMultimem = 1 };
// kOneShot  every rank pushes all of x to every rank, one flag crossing, local sum.
// kTwoShot  scatter pieces, owner reduces + pushes the sum into every gather buffer, local epilogue.
// kLamport  one-shot without flags: the pushed data is its own flag (sentinel-filled buffers, polled).
// kLean     two-shot by whole rows: the owner adds the residual and norms in registers and pushes the
//           finished rows straight into every rank's out (and residual): destinations are symmetric.
// kLamportTwoShot  two-shot without flags: the reduce-scatter and the all-gather both poll sentinel-filled
//           buffers (the mid range, where a one-shot moves too many bytes and flags cost a crossing each).
// kLeanBulk kLean with its scatter moved to a copy warp (TMA bulk copies through shared memory), which also
//           releases the scatter's flags: the other warps finish rows meanwhile and never wait on a fence.
// kLeanPull kLean where x is a symmetric tensor too: no scatter, the owner reads its rows of every rank's x
//           where they lie (p2p: W loads; multimem: one ld_reduce through x's multicast address).
enum class Algo : int {
  kAuto = 0, kOneShot = 1, kTwoShot = 2, kLamport = 3, kLean = 4, kLamportTwoShot = 5, kLeanBulk = 6, kLeanPull = 7
};
// Where the kernel's input comes from:
//   kResident    x is complete when the kernel starts
//   kTracked     x is being written by a producer on another stream; chunk c is read once ready[c] says so
//   kCopyEngine  (two-shot, p2p) the copy engines already scattered each chunk's pieces into the peers'
//                staging slots and raised a staged flag per (source, chunk); the kernel starts at the reduce
enum class Feed : int { kResident = 0, kTracked = 1, kCopyEngine = 2 };

using Vec = uint4;  // one 16-byte access
static_assert(sizeof(Vec) == 16, "all data movement is in 16-byte vectors");

// Per-rank symmetric workspace, same layout on every rank (offsets in bytes from the workspace base):
//   flags    [2 parity][2 phase][kMaxWorld src][kMaxChunks] uint64   written by src, read here
//   headers  [2 parity][kMaxWorld src] CallHeader                    what src called (diagnostics)
//   probe    [kMaxWorld src] uint64                                  peer-access check at creation
//   staged   [kMaxWorld src][kMaxChunks] uint32                      copy-engine feed: 1 = src's piece landed
//   lamport  [3 buffers][2 regions][world src] { header Vec, data [kLamportSlotBytes] }  sentinel-filled (-0.0
//            halves); region 0 (S) takes pushed x (Lamport one-shot, the Lamport two-shot's scatter), region 1 (G)
//            the Lamport two-shot's reduced rows (its gather)
//   data     [2 halves] { slots [world][slot_bytes], gather [gather_bytes] }
// Calls alternate halves and flag parities by epoch, so call e may overwrite what call e-2 used:
// a rank that finished call e-1 saw every peer start e-1, hence finish e-2 (kernels on one stream).
struct Layout {
  uint64_t flags_off;
  uint64_t headers_off;
  uint64_t probe_off;
  uint64_t staged_off;
  uint64_t lamport_off;
  uint64_t lamport_slot_bytes;  // one source's header vector + data in one Lamport buffer
  uint64_t data_off;
  uint64_t slot_bytes;    // one source's slot: a 1/world piece of every chunk (two-shot) or all of x (one-shot)
  uint64_t gather_bytes;  // the reduced result, row-major, read by the norm epilogue
  uint64_t half_bytes;
  uint64_t total_bytes;
  uint64_t capacity_bytes;  // largest x (bytes) one launch takes
  int world;
  int pad_;
};
static_assert(sizeof(Layout) == 12 * 8 + 8, "Layout is exported to Python field by field (torch_ops.cpp layout())");

// What a rank tells its peers about the call it is making (written before its first flag).
struct CallHeader {
  uint32_t sig;     // hash of everything below; also carried in every flag
  uint32_t epoch;
  uint32_t op;      // OpBits
  int32_t dtype;
  int64_t tokens;
  int32_t hidden;
  int32_t ctas;
  int32_t chunk_rows;
  int32_t algo;
  uint64_t reserved[3];
};
static_assert(sizeof(CallHeader) == 64, "CallHeader is read back by Python as 64 bytes");

constexpr uint64_t kFlagsBytes = 2ull * 2 * kMaxWorld * kMaxChunks * sizeof(uint64_t);
constexpr uint64_t kHeadersBytes = 2ull * kMaxWorld * sizeof(CallHeader);
constexpr uint64_t kProbeBytes = kMaxWorld * sizeof(uint64_t);
constexpr uint64_t kStagedBytes = uint64_t(kMaxWorld) * kMaxChunks * sizeof(uint32_t);

__host__ __device__ inline uint64_t round_up(uint64_t x, uint64_t m) { return (x + m - 1) / m * m; }

// capacity_bytes: the largest x a launch takes. Each chunk's 1/world piece rounds up by at most one
// vector, so a slot needs capacity/world plus one vector per chunk.
__host__ __device__ inline Layout make_layout(uint64_t capacity_bytes, int world) {
  Layout l{};
  l.world = world;
  l.capacity_bytes = round_up(capacity_bytes, 16);
  l.flags_off = 0;
  l.headers_off = l.flags_off + kFlagsBytes;
  l.probe_off = l.headers_off + kHeadersBytes;
  l.staged_off = l.probe_off + kProbeBytes;
  l.lamport_off = round_up(l.staged_off + kStagedBytes, 4096);
  l.lamport_slot_bytes = 16 + kLamportSlotBytes;
  l.data_off = round_up(l.lamport_off + 3ull * kLamportRegions * world * l.lamport_slot_bytes, 4096);
  l.slot_bytes = round_up(l.capacity_bytes / world + 16 + uint64_t(kMaxChunks) * 16, 256);
  l.gather_bytes = round_up(l.capacity_bytes, 256);
  l.half_bytes = round_up(world * l.slot_bytes + l.gather_bytes, 4096);
  l.total_bytes = l.data_off + 2 * l.half_bytes;
  return l;
}

enum ErrorCode : int64_t { kErrNone = 0, kErrTimeout = 1, kErrMismatch = 2, kErrProducerTimeout = 3 };

// Lives in pinned host memory, mapped into the device address space (UVA), so Python reads it
// without a device synchronisation and it survives a kernel that gave up.
struct ErrorRecord {
  int64_t code;      // ErrorCode; written last
  int64_t rank;      // the rank that detected the problem (this one)
  int64_t peer;      // the rank it waited for
  int64_t epoch;     // call sequence number (1-based, per Communicator)
  int64_t chunk;     // chunk being waited for
  int64_t own_sig;   // this call's signature
  int64_t peer_sig;  // signature found in the peer's flag (mismatch), or the stale flag's epoch (timeout)
  int64_t op;        // this call's OpBits
};
static_assert(sizeof(ErrorRecord) == 64, "ErrorRecord is read by Python as 8 int64");

// This rank's private device-side state (not symmetric).
struct LocalState {
  uint32_t epoch;    // calls completed; the next call uses epoch + 1 on every rank
  uint32_t ticket;   // CTAs that finished the current call; the last one advances `epoch`
  uint32_t claimed;  // first error wins the ErrorRecord
  uint32_t abort;    // set on any error: every later wait gives up at once, every later call poisons
  // Lamport calls completed (only Lamport calls count: buffer k % 3 belongs to the k-th Lamport call, so
  // calls of other algorithms in between never leave a buffer uncleared).
  uint32_t lamport_seq;
  // What the call using buffer i wrote, i.e. what must be re-cleared: vectors per slot in the low bits
  // (at most kLamportSlotBytes / 16 = 2^17), and kLamportUsedG when region G was written too (Lamport
  // two-shot). A flag bit rather than a field: sizeof(LocalState) is fixed by Python's STATE_WORDS.
  uint32_t lamport_vecs[3];
};
constexpr uint32_t kLamportUsedG = 1u << 31;
static_assert(kLamportSlotBytes / 16 < kLamportUsedG, "the vector count must leave lamport_vecs' flag bit free");
static_assert(sizeof(LocalState) == 32, "LocalState is allocated by Python as STATE_WORDS int32");

// Everything a kernel needs to reach its peers. Passed by value (fits in kernel parameter space).
struct CommDevice {
  char* ws[kMaxWorld];  // every rank's workspace base (unicast, peer-mapped); ws[rank] is ours
  char* mc;             // multicast address of the workspace; nullptr unless the multimem transport
  LocalState* state;
  ErrorRecord* err;
  Layout layout;
  uint64_t timeout_ns;
  int rank;
  int world;
};

}  // namespace tokenweave

// Host-side planning of one collective launch: chunking, grid, row groups, call signature.
// Torch-free; the torch glue and the Python dispatcher both go through plan_allreduce.
#pragma once

#include <cstdint>

#include "tokenweave/types.h"

namespace tokenweave {

// What the kernel is asked to produce (part of the call signature).
// kOpShardedResidual (kLean only): residual holds only the rows this rank owns (shard_rows), not all rows.
enum OpBits : uint32_t { kOpResidual = 1u, kOpNorm = 2u, kOpShardedResidual = 4u };

// Every rank's address of one symmetric tensor (kLean destinations, kLeanPull's x), and its multicast address (0 unless
// multimem). `ident` names the allocation and offset: part of the signature, so ranks that pass different
// destinations fail as a mismatch instead of writing into each other's unrelated memory.
struct PeerTable {
  char* ptr[kMaxWorld];
  char* mc;
  uint64_t ident;
};

struct CallArgs {
  const void* x;
  void* out;
  void* residual;
  const void* weight;
  int64_t tokens;
  int hidden;
  float eps;
  int algo;        // Algo::kOneShot or Algo::kTwoShot (never kAuto here)
  int dtype;       // DType
  int ctas;        // grid size actually launched
  int chunk_rows;  // rows per chunk
  int n_chunks;
  int group;       // threads per row in the epilogue
  uint32_t op;     // OpBits
  uint32_t sig;    // call signature, identical on every rank making the same call
  // Track-and-trigger (ready == nullptr: x is complete at launch). ready[c] counts the producer pieces
  // finished for chunk c over all calls, consumed[c] what earlier calls waited for: chunk c of this call
  // may be read once ready[c] - consumed[c] >= its pieces. Both only grow: CUDA-graph replays need no reset.
  const uint32_t* ready;
  uint32_t* consumed;
  uint32_t pieces_full;  // producer pieces of a full chunk
  uint32_t pieces_last;  // ... of the last chunk
  // Copy-engine feed (Feed::kCopyEngine): set to 1 by CTA 0 once every rank has entered this call, i.e.
  // finished its previous one; the copy stream waits for it before its first copy (tokenweave.h).
  uint32_t* go;
  int feed;  // Feed
  // kLean: rows are owned by rank in contiguous shards of shard_rows (rank q: [q * shard_rows, ...));
  // out (and a replicated residual) are written through these tables on every rank.
  int64_t shard_rows;
  PeerTable out_peers;
  PeerTable res_peers;
  PeerTable x_peers;  // kLeanPull: every rank's x, read by the owners of its rows
};

inline int lanes_of(DType d) { return d == DType::kFloat32 ? 4 : 8; }

// FNV-1a over the fields every rank must agree on.
inline uint32_t call_signature(const CallArgs& a) {
  const int64_t fields[] = {a.op,   a.algo, a.dtype, a.tokens, a.hidden, a.ctas, a.chunk_rows, a.feed,
                            int64_t(a.out_peers.ident), int64_t(a.res_peers.ident), int64_t(a.x_peers.ident)};
  uint32_t h = 2166136261u;
  for (int64_t f : fields)
    for (int b = 0; b < 8; ++b) h = (h ^ uint32_t((f >> (8 * b)) & 0xff)) * 16777619u;
  return h == 0 ? 1 : h;
}

// Fills algo-dependent fields of `a` (ctas, chunk_rows, n_chunks, group, sig) from the request.
// Returns nullptr on success or a message saying what to change.
// chunks_per_cta > 1 lets each CTA pipeline its chunks (scatter of chunk k+1 while waiting for k).
// chunk_rows > 0: the rows per chunk were decided already (a track-and-trigger call plans its geometry
// once, with this function, and hands it to the producer, the copy engines and the consumer alike); they
// are then only checked here, never re-derived, so every role of the call sees the same chunks.
const char* plan_allreduce(CallArgs& a, const Layout& l, int ctas, int chunks_per_cta, int chunk_rows = 0);

}  // namespace tokenweave

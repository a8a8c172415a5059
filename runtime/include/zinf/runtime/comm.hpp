#pragma once
// Collectives between data-parallel ranks, one process per rank. CPU ranks use Gloo (Debian's
// libgloo) over TCP; GPU ranks will use NCCL behind the same interface (the CUDA issue).
//
// Rendezvous: rank 0 serves a small key-value store on MASTER_ADDR:MASTER_PORT that the ranks use
// to exchange their Gloo addresses (the role torchrun's TCPStore plays). Every collective and the
// rendezvous itself have a timeout, so a rank that died ends the job with an error instead of a
// hang.

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

namespace zinf::runtime {

// 60 s, or ZINF_COMM_TIMEOUT seconds (zinf::Error for a value that is not a positive number).
std::chrono::milliseconds default_comm_timeout();

// Where this process sits in the job, from the launcher's environment.
struct RankInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source;  // "torchrun", "mpirun", "srun" or "single process"
  std::string job_id = "zinf";  // prefixes the rendezvous keys
};

// Reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun,
// zinf launch), else OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE (mpirun), else
// SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_TASKS_PER_NODE (srun). MASTER_ADDR defaults to
// 127.0.0.1 (a job on one host); a job on several hosts must set it. The job id that keeps two jobs
// on one port apart comes from ZINF_JOB_ID (zinf launch), TORCHELASTIC_RUN_ID, SLURM_JOB_ID or
// OMPI_MCA_ess_base_jobid. None of these: a single process. Throws zinf::Error naming the variable for a
// malformed or inconsistent value (a rank outside the world, a port out of range, ...).
RankInfo rank_info_from_environment();

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Sum over ranks, in place; every rank gets the same bits.
  virtual void all_reduce_sum(std::span<float> data) = 0;
  // out (size() * in.size()) = every rank's `in`, in rank order.
  virtual void all_gather(std::span<const float> in, std::span<float> out) = 0;
  // out (in.size() / size()) = this rank's shard of the sum over ranks of `in`; in.size() must be
  // a multiple of size().
  virtual void reduce_scatter_sum(std::span<const float> in, std::span<float> out) = 0;
  virtual void broadcast(std::span<float> data, int root) = 0;
  virtual void broadcast_bytes(std::span<std::byte> data, int root) = 0;
  // timeout 0: the communicator's; a longer one for waits that include slow work (a checkpoint
  // that one rank writes while the others wait).
  virtual void barrier(std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) = 0;
  // A second, independent channel between the same ranks, for collectives issued from another
  // thread (the stage-3 prefetcher gathers while the compute thread reduces). Collective: every
  // rank calls it, in the same order. The parent must outlive the child. Gloo channels may be
  // used at once in any interleaving. Two NCCL channels on one GPU may deadlock unless every rank
  // launches their kernels in the same order (NCCL's rule for concurrent communicators): a GPU
  // caller must order them, e.g. by the static schedule.
  virtual std::unique_ptr<Communicator> split(const std::string& name) = 0;
};

struct GlooOptions {
  // Rendezvous and every collective; ZINF_COMM_TIMEOUT (seconds) overrides the default.
  std::chrono::milliseconds timeout = default_comm_timeout();
  std::string interface_address;  // address to bind Gloo's transport to; empty = MASTER_ADDR's side
};

// Connects all ranks (blocks until every rank has joined or the timeout passes). Throws zinf::Error
// naming the address, the rank and what to check when the rendezvous fails.
std::unique_ptr<Communicator> make_gloo_communicator(const RankInfo& info, const GlooOptions& options = {});

// The same, with the ranks exchanging addresses through an in-process store: for ranks that are
// threads of one process (tests). `store_id` names the shared store (one per group).
std::unique_ptr<Communicator> make_gloo_communicator_in_process(int rank, int size, const std::string& store_id,
                                                               const GlooOptions& options = {});

// A one-rank communicator: every collective is a copy.
std::unique_ptr<Communicator> make_single_communicator();

}  // namespace zinf::runtime

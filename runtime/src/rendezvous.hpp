#pragma once
// How the ranks find each other (rendezvous.cpp): the store they exchange their Gloo addresses
// through, and the address this rank binds to. Internal to zinf_runtime; gloo_comm.cpp connects.

#include <memory>
#include <string>

#include <gloo/rendezvous/store.h>

#include "zinf/runtime/comm.hpp"

namespace zinf::runtime {

struct Rendezvous {
  gloo::rendezvous::Store* store = nullptr;  // alive while keep_alive is
  std::string bind;                          // the address Gloo's transport binds to
  std::shared_ptr<void> keep_alive;          // the store (and rank 0's server), for the communicator's life
};

// Over TCP: rank 0 serves the store on MASTER_ADDR:MASTER_PORT; keys carry the job id.
Rendezvous tcp_rendezvous(const RankInfo& info, const GlooOptions& options);
// Ranks that are threads of one process (tests): one in-process store per `id`.
Rendezvous in_process_rendezvous(const std::string& id);

}  // namespace zinf::runtime

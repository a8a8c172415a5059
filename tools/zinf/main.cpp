// zinf: train language models larger than the GPUs that train them.
// Exit codes: 0 success, 1 runtime error (bad config, file, environment), 2 usage error.
#include <CLI/CLI.hpp>
#include <unistd.h>
#include <fmt/format.h>

#include <cstdlib>
#include <iostream>

#include "commands.hpp"
#include "zinf/common/build_info.hpp"
#include "zinf/common/error.hpp"
#include "zinf/common/log.hpp"
#include "zinf/kernels/cpu_features.hpp"
#include "zinf/kernels/cpu_optim.hpp"
#include "zinf/kernels/device_info.hpp"

namespace {

std::string version_text() {
  const auto& b = zinf::build_info();
  std::string out = fmt::format("zinf {} ({}, {}{}{})\n", b.version, b.build_type, b.compiler,
                                b.cuda ? fmt::format(", CUDA archs {}", b.cuda_architectures) : std::string(", no CUDA"),
                                b.sanitizers.empty() ? std::string() : fmt::format(", sanitizers {}", b.sanitizers));
  std::string isa;
  try {
    isa = zinf::kernels::cpu::isa_name(zinf::kernels::cpu::active_isa());
    if (std::getenv("ZINF_CPU_ISA") != nullptr) isa += " (forced by ZINF_CPU_ISA)";
  } catch (const zinf::Error& e) {
    isa = fmt::format("{} (ZINF_CPU_ISA ignored here: {})", zinf::kernels::best_cpu_isa(), e.message());
  }
  out += fmt::format("cpu: {} kernels ({})\n", isa, zinf::kernels::describe(zinf::kernels::cpu_features()));
  const auto gpus = zinf::kernels::query_gpus();
  if (gpus.gpus.empty()) {
    out += fmt::format("gpu: none ({})\n", gpus.problem);
  } else {
    for (const auto& g : gpus.gpus) {
      out += fmt::format("gpu {}: {} (sm_{}{}, {:.1f} GiB, {} SMs), driver {}, runtime {}\n", g.index, g.name,
                         g.compute_major, g.compute_minor, static_cast<double>(g.total_memory) / (1 << 30),
                         g.multiprocessors, gpus.driver, gpus.runtime);
    }
  }
  return out;
}

}  // namespace

// oneDNN's OpenMP threads spin after each product by default, and they fight the oneTBB threads
// of the CPU backend's other kernels for the cores: on a 16-core Xeon a model step ran 2x slower
// (bench/results/model-cpu.md). libgomp reads OMP_WAIT_POLICY when it is loaded, before main, so
// zinf sets it and starts itself again, once, when the user has not chosen a policy.
void prefer_passive_openmp(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  ::setenv("OMP_WAIT_POLICY", "passive", 0);
  ::execv("/proc/self/exe", argv);  // returns only on failure: then run on with the default policy
}

int main(int argc, char** argv) {
  prefer_passive_openmp(argv);
  CLI::App app{"zinf: ZeRO-3 offload training for language models larger than the GPUs that train them", "zinf"};
  app.set_version_flag("--version", [] { return version_text(); }, "print version, build and hardware information");
  app.require_subcommand(1);
  app.fallthrough();
  std::string log_level;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical, off (default: ZINF_LOG_LEVEL or info)");

  zinf::tools::Action action;
  zinf::tools::add_config_commands(app, action);
  zinf::tools::add_bench_commands(app, action);
  zinf::tools::add_train_commands(app, action);
  zinf::tools::add_data_commands(app, action);
  zinf::tools::add_ckpt_commands(app, action);
  zinf::tools::add_plan_command(app, action);
  zinf::tools::add_tune_command(app, action);

  // An unknown command where one is required gets the list of commands (CLI11 says only "A
  // subcommand is required"). Commands that require one take no options of their own, except the
  // top level's --log-level and its value.
  {
    CLI::App* at = &app;
    std::string path = "zinf";
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--log-level") {
        ++i;
        continue;
      }
      if (a.empty() || a[0] == '-') continue;
      CLI::App* sub = nullptr;
      for (CLI::App* c : at->get_subcommands([](const CLI::App*) { return true; })) {
        if (c->check_name(a)) sub = c;
      }
      if (sub == nullptr) {
        if (at->get_require_subcommand_min() == 0) break;
        std::string names;
        for (const CLI::App* c : at->get_subcommands([](const CLI::App*) { return true; })) {
          if (!names.empty()) names += ", ";
          names += c->get_name();
        }
        std::cerr << "unknown command '" << path << " " << a << "': choose one of " << names << " ('" << path
                  << " --help' says what each does)\n";
        return zinf::kExitUsageError;
      }
      at = sub;
      path += " " + a;
    }
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);  // prints the message and the usage hint
    return zinf::kExitUsageError;
  }

  try {
    zinf::log::init({.rank = std::nullopt, .level = log_level, .file = {}});
    return action ? action() : zinf::kExitUsageError;
  } catch (const zinf::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return zinf::kExitRuntimeError;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return zinf::kExitRuntimeError;
  }
}

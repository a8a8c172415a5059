# Every dependency is a Debian package (scripts/install-deps.sh installs them) linked as an
# imported target.
find_package(PkgConfig REQUIRED)
find_package(Threads REQUIRED)
find_package(fmt REQUIRED)
find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(CLI11 REQUIRED)
find_package(TBB REQUIRED)
# Gloo (libgloo-dev): CPU collectives between ranks; its package config defines the target `gloo`.
find_package(Gloo REQUIRED PATHS /usr/share/cmake/Gloo)
pkg_check_modules(URING REQUIRED IMPORTED_TARGET liburing)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)
pkg_check_modules(SENTENCEPIECE REQUIRED IMPORTED_TARGET sentencepiece)
if(ZINF_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# yaml-cpp 0.7 on Debian exports the plain target name only.
if(TARGET yaml-cpp AND NOT TARGET yaml-cpp::yaml-cpp)
  add_library(yaml-cpp::yaml-cpp ALIAS yaml-cpp)
endif()

# oneDNN: Debian's dnnl-config.cmake insists on OpenCL headers (its GPU runtime) that zinf does not
# use, so the library is found directly and wrapped in the target name its config would define.
if(NOT TARGET DNNL::dnnl)
  find_path(ZINF_DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.hpp REQUIRED)
  find_library(ZINF_DNNL_LIBRARY NAMES dnnl REQUIRED)
  add_library(DNNL::dnnl UNKNOWN IMPORTED)
  set_target_properties(DNNL::dnnl PROPERTIES IMPORTED_LOCATION "${ZINF_DNNL_LIBRARY}"
                                              INTERFACE_INCLUDE_DIRECTORIES "${ZINF_DNNL_INCLUDE_DIR}")
endif()

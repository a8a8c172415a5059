# One INTERFACE target carries the language level, warnings and sanitizer switches; every zinf
# target links it, so these settings live in exactly one place.
add_library(zinf_options INTERFACE)
add_library(zinf::options ALIAS zinf_options)
target_compile_features(zinf_options INTERFACE cxx_std_20)
set(CMAKE_CXX_EXTENSIONS OFF)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)

set(_zinf_cxx_warnings -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wcast-align
    -Woverloaded-virtual -Wnull-dereference -Wimplicit-fallthrough)
target_compile_options(zinf_options INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:${_zinf_cxx_warnings}>
  $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${ZINF_WERROR}>>:-Werror>)

if(ZINF_SANITIZE)
  string(REPLACE ";" "," _zinf_san "${ZINF_SANITIZE}")
  target_compile_options(zinf_options INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${_zinf_san} -fno-omit-frame-pointer -fno-sanitize-recover=all>)
  target_link_options(zinf_options INTERFACE -fsanitize=${_zinf_san})
endif()

# Fuzzing: instrument every zinf target for coverage so libFuzzer sees into the libraries, not just
# the harness (the harness itself links -fsanitize=fuzzer).
if(ZINF_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "ZINF_FUZZ=ON needs clang (configure with -DCMAKE_CXX_COMPILER=clang++)")
  endif()
  target_compile_options(zinf_options INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=fuzzer-no-link>)
endif()

# Decides MEMBRAIN_WITH_CUDA from MEMBRAIN_CUDA (AUTO|ON|OFF) and sets up the CUDA language.
# The CUDA runtime is linked statically so the extension imports on machines without a
# CUDA installation; without a driver or device it simply reports zero devices.
include(CheckLanguage)

set(MEMBRAIN_WITH_CUDA OFF)
if(NOT MEMBRAIN_CUDA STREQUAL "OFF")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MEMBRAIN_WITH_CUDA ON)
  elseif(MEMBRAIN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MEMBRAIN_CUDA=ON but no CUDA compiler was found (set CUDACXX or put nvcc on PATH)")
  endif()
endif()

if(MEMBRAIN_WITH_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    # Ampere and Hopper machine code, plus Hopper PTX for newer chips to JIT.
    set(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
  endif()
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "Membrain: CUDA kernels ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "Membrain: CUDA kernels OFF")
endif()

function(membrain_configure_cuda_target target)
  set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Static)
  target_link_libraries(${target} PRIVATE CUDA::cudart_static)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr -Xcompiler=-fPIC -Xcompiler=-Wall -Xcompiler=-Wextra -lineinfo>)
endfunction()

# Conditional CUDA support for charmlp.
#
# CHARMLP_CUDA=AUTO enables the CUDA kernels when torch was built with CUDA and
# CMake finds nvcc; ON requires them; OFF never builds them. A CPU-only machine
# builds and passes every test without any of this.
#
# Sets CHARMLP_CUDA_SOURCES and defines charmlp_configure_cuda_target(target).
#
# Toolkit quirks handled here (see tools/check_cuda_build.sh):
#  * nvcc is looked for in CUDA_HOME / CUDA_PATH / /usr/local/cuda when it is not
#    on PATH, so `pip install .` works without setting CUDACXX.
#  * A toolkit installed without the cuBLAS/cuSPARSE/... headers (only nvcc and
#    cudart) cannot compile ATen's CUDA headers. The pip wheels that the CUDA
#    build of torch depends on ship those headers (site-packages/nvidia/cu*/include);
#    when the toolkit lacks cublas_v2.h they are appended to the include path.
#    A full toolkit (the usual case on a GPU machine) is left alone.

set(CHARMLP_CUDA_SOURCES "")
set(CHARMLP_WITH_CUDA OFF)

if(NOT CHARMLP_CUDA STREQUAL "OFF" AND NOT CHARMLP_TORCH_CUDA STREQUAL "")
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    foreach(_charmlp_root "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" "${CUDA_TOOLKIT_ROOT_DIR}" /usr/local/cuda)
      if(_charmlp_root AND EXISTS "${_charmlp_root}/bin/nvcc")
        set(CMAKE_CUDA_COMPILER "${_charmlp_root}/bin/nvcc" CACHE FILEPATH "CUDA compiler")
        break()
      endif()
    endforeach()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(CHARMLP_WITH_CUDA ON)
  elseif(CHARMLP_CUDA STREQUAL "ON")
    message(FATAL_ERROR "charmlp: CHARMLP_CUDA=ON but no CUDA compiler was found "
                        "(set CUDACXX or CMAKE_CUDA_COMPILER to nvcc)")
  endif()
elseif(CHARMLP_CUDA STREQUAL "ON")
  message(FATAL_ERROR "charmlp: CHARMLP_CUDA=ON but torch ${CHARMLP_TORCH_VERSION} has no CUDA")
endif()

if(CHARMLP_WITH_CUDA)
  if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
    set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0")
  elseif(TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(ENV{TORCH_CUDA_ARCH_LIST} "${TORCH_CUDA_ARCH_LIST}")
  endif()
  # torch's CMake config (Caffe2/public/cuda.cmake) finds the toolkit from this.
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    get_filename_component(_charmlp_nvcc_dir "${CMAKE_CUDA_COMPILER}" DIRECTORY)
    get_filename_component(CUDA_TOOLKIT_ROOT_DIR "${_charmlp_nvcc_dir}" DIRECTORY)
    set(CUDA_TOOLKIT_ROOT_DIR "${CUDA_TOOLKIT_ROOT_DIR}" CACHE PATH "CUDA toolkit root")
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)

  # Missing library headers: borrow the ones from torch's nvidia-* wheels.
  set(CHARMLP_CUDA_EXTRA_INCLUDE "")
  if(NOT EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/include/cublas_v2.h")
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
        "import glob, os, site, sys; c = [d for p in site.getsitepackages() + [site.getusersitepackages()] for d in sorted(glob.glob(os.path.join(p, 'nvidia', '*', 'include'))) if os.path.exists(os.path.join(d, 'cublas_v2.h'))]; print(c[0] if c else '')"
      OUTPUT_VARIABLE CHARMLP_CUDA_EXTRA_INCLUDE OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(CHARMLP_CUDA_EXTRA_INCLUDE)
      message(STATUS "charmlp: ${CUDA_TOOLKIT_ROOT_DIR} has no cuBLAS headers; using ${CHARMLP_CUDA_EXTRA_INCLUDE}")
      # -isystem: searched after every -I (nvcc puts the toolkit's own include dir
      # there), so the toolkit's cuda_runtime.h etc. still win over the wheel's copies.
      set(CHARMLP_CUDA_EXTRA_FLAGS "-isystem ${CHARMLP_CUDA_EXTRA_INCLUDE}")
    else()
      message(WARNING "charmlp: ${CUDA_TOOLKIT_ROOT_DIR} lacks cublas_v2.h and no nvidia-* wheel "
                      "provides it; ATen's CUDA headers will probably not compile")
    endif()
  endif()

  # Same for libnvrtc, which torch's CMake config puts on the link line
  # (CUDA_nvrtc_LIBRARY): at run time torch has already loaded the wheel's copy.
  if(NOT CUDA_nvrtc_LIBRARY)
    file(GLOB _charmlp_nvrtc "${CUDA_TOOLKIT_ROOT_DIR}/lib64/libnvrtc.so*" "${CUDA_TOOLKIT_ROOT_DIR}/lib/libnvrtc.so*"
                             "${CUDA_TOOLKIT_ROOT_DIR}/targets/*/lib/libnvrtc.so*")
    if(NOT _charmlp_nvrtc)
      execute_process(
        COMMAND "${Python_EXECUTABLE}" -c
          "import glob, os, site; c = [f for p in site.getsitepackages() for f in sorted(glob.glob(os.path.join(p, 'nvidia', '*', 'lib', 'libnvrtc.so*'))) if 'builtins' not in f and '.alt.' not in f]; print(c[0] if c else '')"
        OUTPUT_VARIABLE _charmlp_wheel_nvrtc OUTPUT_STRIP_TRAILING_WHITESPACE)
      if(_charmlp_wheel_nvrtc)
        message(STATUS "charmlp: ${CUDA_TOOLKIT_ROOT_DIR} has no libnvrtc; using ${_charmlp_wheel_nvrtc}")
        set(CUDA_nvrtc_LIBRARY "${_charmlp_wheel_nvrtc}" CACHE FILEPATH "libnvrtc (from torch's nvidia wheel)" FORCE)
        set(CUDA_NVRTC_LIB "${_charmlp_wheel_nvrtc}" CACHE FILEPATH "" FORCE)
      endif()
    endif()
  endif()

  enable_language(CUDA)
  if(CHARMLP_CUDA_EXTRA_INCLUDE)
    string(APPEND CMAKE_CUDA_FLAGS " ${CHARMLP_CUDA_EXTRA_FLAGS}")
    string(APPEND CMAKE_CXX_FLAGS " ${CHARMLP_CUDA_EXTRA_FLAGS}")
  endif()
  # Kernels (*.cu, nvcc) and their host wrappers (*.cpp, the C++ compiler): see
  # csrc/cuda/kernels.h for why they are split.
  file(GLOB CHARMLP_CUDA_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu"
                                                   "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cpp")
  message(STATUS "charmlp: CUDA kernels ON (torch CUDA ${CHARMLP_TORCH_CUDA}, arch $ENV{TORCH_CUDA_ARCH_LIST})")
else()
  message(STATUS "charmlp: CUDA kernels OFF")
endif()

function(charmlp_configure_cuda_target target)
  if(CHARMLP_WITH_CUDA)
    string(REPLACE ";" " " _archs "$ENV{TORCH_CUDA_ARCH_LIST}")
    target_compile_definitions(${target} PRIVATE
      CHARMLP_WITH_CUDA
      CHARMLP_CUDA_ARCH_LIST="${_archs}"
      CHARMLP_CUDA_VERSION="${CHARMLP_TORCH_CUDA}")
    # The flags torch's own extension builder uses: c10::Half/BFloat16 provide the
    # arithmetic, so CUDA's half operators would only make overloads ambiguous.
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:
      -O3 --expt-relaxed-constexpr -lineinfo
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__>)
    # cuBLAS is reached through ATen (libtorch_cuda), never directly.
  endif()
endfunction()

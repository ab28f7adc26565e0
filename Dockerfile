# The image every Ray pod runs (head, workers, RayJob submitter): the pinned Ray image
# plus torch (CPU build) plus this package, so `python -m dtrain train --driver` works
# in the pods without a runtime_env download.
#   docker build -t dtrain:0.1.0-ray2.60.0 .        (scripts/35-build-load-image.sh does it)
# Tag it <package version>-ray<Ray version>: `dtrain k8s validate` reads the Ray version
# from the tag and checks it against rayVersion and the Ray installed on your machine.
# Both ARG defaults must equal dtrain/versions.py (RAY_IMAGE, TORCH_VERSION); a test checks.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0

# The ray image's own non-root user: uid 1000 (ray), gid 100 (users); the pods run as it.
# The folder is made by that user first: WORKDIR alone would create it owned by root and
# the in-tree build of `pip install .` could not write there.
USER 1000
RUN mkdir -p /home/ray/dtrain
WORKDIR /home/ray/dtrain
COPY --chown=1000:100 pyproject.toml requirements.lock README.md* ./
COPY --chown=1000:100 lib ./lib

# torch from the CPU wheel index (the PyPI wheel drags in GBs of CUDA), then the package
# with every dependency held to requirements.lock, the same pins the tests ran with.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir -c requirements.lock . \
 && python -c "import ray, torch, dtrain; print('ray', ray.__version__, 'torch', torch.__version__, 'dtrain', dtrain.__version__)"

USER 1000

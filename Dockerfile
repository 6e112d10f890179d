# skincluster on a GPU Ray cluster: the image the cluster launcher (cluster.yaml) runs.
#   docker build -t $REGISTRY/skincluster:0.1.0 . && docker push $REGISTRY/skincluster:0.1.0
# ray-ml images stopped at Ray 2.30; the plain Ray image plus TensorFlow is current.
FROM rayproject/ray:2.60.0-py311-gpu

# Keras 2 (tf-keras): MultiWorkerMirroredStrategy crashes on Keras 3 (see README).
ENV TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, in their own layer: it only changes when the pins do.
# tensorflow[and-cuda] brings the CUDA/cuDNN wheels; tf-keras must match it.
RUN pip install "tensorflow[and-cuda]==2.21.0" "tf-keras==2.21.0"

WORKDIR /home/ray/skincluster
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users skincluster ./skincluster
COPY --chown=ray:users jobs ./jobs
# The project's own pins (ray is already the base image's 2.60.0 and stays so).
RUN pip install . "ray[default,train,tune,data]==2.60.0"

# The base image's non-root user (rayproject images name it "ray").
# hadolint ignore=DL3066
USER ray
CMD ["skincluster", "--help"]

//! apps/v1 and batch/v1 objects: defaults, validation and generation as kube-apiserver's strategies apply them.

//! The `scale` subresource (`autoscaling/v1` Scale) of Deployments, ReplicaSets, StatefulSets and custom resources.

//! Custom resources: what an applied CustomResourceDefinition makes served (discovery, schema validation, defaulting, pruning, subresources, printer columns).

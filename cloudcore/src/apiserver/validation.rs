//! Field validation (`fieldValidation=Strict|Warn|Ignore`): unknown and duplicate fields, as kube-apiserver reports them.

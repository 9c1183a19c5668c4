//! Server-side apply: managedFields, field managers, conflicts and force (`application/apply-patch+yaml`).

//! `dryRun=All`: what a request would have stored, answered without writing.

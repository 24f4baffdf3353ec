//! Hash maps for the hot path: foldhash instead of SipHash. Keys here are
//! ids chosen by an org's own admins (or hashes), so hash flooding would
//! only slow the org that did it; foldhash still seeds each map randomly.

pub type FastHash = foldhash::fast::RandomState;
pub type Map<K, V> = std::collections::HashMap<K, V, FastHash>;
pub type Set<T> = std::collections::HashSet<T, FastHash>;

//! placeholder while the dependency builds

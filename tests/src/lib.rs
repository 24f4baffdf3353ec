//! integration suite

//! The `wkvc` command-line tool as a library: `args` declares the command line; each
//! subcommand is a module of `cmd`; `common` holds what they share; `serve` is the
//! OpenAI-compatible server. The binary (`src/main.rs`) dispatches to them; the fuzz targets
//! (`fuzz/`) reach the server's request parsing through [`serve::request`].

pub mod args;
pub mod cmd;
pub mod common;
pub mod serve;

//! One module per subcommand, each with `run(args)`.

pub mod bench;
pub mod compile;
pub mod emit;
pub mod eval;
pub mod inspect;
pub mod plots;
pub mod run;

//! wkvc-ir owns the graph IR: element types and symbolic shapes, the tensor-level op set,
//! graphs and their builder, the stable text form (print + parse), the verifier, the
//! reference interpreter that defines what every op means, the weight store, and model import
//! from Hugging Face directories and GGUF files.

pub mod config;
pub mod gguf;
pub mod grad;
pub mod graph;
pub mod import;
pub mod interp;
pub mod kernel;
pub mod kvcache;
pub mod math;
pub mod quant;
pub mod text;
pub mod types;
pub mod verify;
pub mod weights;

pub use config::{ModelConfig, RopeScaling};
pub use graph::{Attr, Attrs, Builder, Graph, Node, OpKind, Operand, ValueId};
pub use interp::{Interpreter, RunMode, Tensor, TensorData};
pub use kernel::{Act, KernelSpec};
pub use kvcache::{KvCache, KvLayer};
pub use types::{DType, Dim, TensorType};
pub use weights::{Weight, WeightStore};

use std::path::PathBuf;

/// A graph plus the weights its params name.
#[derive(Clone, Debug)]
pub struct Module {
    pub graph: Graph,
    pub weights: WeightStore,
}

impl Module {
    /// Verify the graph, including every param against the weight store.
    pub fn verify(&self) -> Result<(), verify::VerifyError> {
        let st = |n: &str| self.weights.type_of(n);
        verify::verify_with(&self.graph, Some(&st))
    }
}

/// An I/O error's reason without the OS error number ("No such file or directory").
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that could not be read (the cause is part of the message, not a separate
    /// source, so that an error chain names it once).
    #[error("{}: {}", path.display(), io_reason(cause))]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
    #[error(transparent)]
    Parse(#[from] text::ParseError),
    #[error("token id {id} is out of range: the vocabulary has {vocab} tokens")]
    TokenOutOfRange { id: i64, vocab: usize },
    #[error(
        "context overflow: the cache holds {have} tokens, {adding} more would exceed the \
         maximum context of {max}"
    )]
    ContextOverflow {
        have: usize,
        adding: usize,
        max: usize,
    },
    #[error("interpreter: {0}")]
    Interp(String),
}

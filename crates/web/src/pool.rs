//! The browser's rayon pool, for the build with atomics: the kernels'
//! `par_iter`s and gemm's splits run on Web Workers that share this module's
//! memory. Browsers give wasm no thread spawning, so the page's JavaScript
//! starts the workers (`worker.js`) and each one hands its thread to rayon
//! through [`run_pool_thread`].
//!
//! Order matters: JS starts every worker (each blocks in [`run_pool_thread`]),
//! then calls [`ThreadPool::build`], whose spawn handler passes one rayon
//! thread to each waiting worker. Nothing may touch rayon before that, or
//! rayon would build its default global pool (which cannot start threads here).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use rayon::ThreadBuilder;
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
pub struct ThreadPool {
    threads: usize,
    sender: SyncSender<ThreadBuilder>,
    /// Boxed so that its address, which the workers receive, never moves.
    receiver: Box<Mutex<Receiver<ThreadBuilder>>>,
}

#[wasm_bindgen]
impl ThreadPool {
    #[wasm_bindgen(constructor)]
    pub fn new(threads: usize) -> Result<ThreadPool, JsError> {
        if threads == 0 {
            return Err(JsError::new("a thread pool needs at least one thread"));
        }
        let (sender, receiver) = sync_channel(threads);
        Ok(ThreadPool {
            threads,
            sender,
            receiver: Box::new(Mutex::new(receiver)),
        })
    }

    /// What each worker passes to [`run_pool_thread`]: the address of the
    /// channel it takes its rayon thread from.
    pub fn receiver(&self) -> usize {
        &*self.receiver as *const Mutex<Receiver<ThreadBuilder>> as usize
    }

    /// Makes these workers rayon's global pool. Call once every worker has
    /// reported that it waits in [`run_pool_thread`]; the pool must outlive them,
    /// so JS keeps it (and never frees it) for the life of the page.
    pub fn build(&self) -> Result<(), JsError> {
        let sender = self.sender.clone();
        rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .spawn_handler(move |thread| {
                // The channel holds one thread per worker, so this never blocks.
                sender
                    .try_send(thread)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            })
            .build_global()
            .map_err(|e| JsError::new(&format!("cannot start the thread pool: {e}")))
    }
}

/// The module and memory a pool worker instantiates to share this instance's heap.
#[wasm_bindgen(js_name = sharedModule)]
pub fn shared_module() -> JsValue {
    wasm_bindgen::module()
}

#[wasm_bindgen(js_name = sharedMemory)]
pub fn shared_memory() -> JsValue {
    wasm_bindgen::memory()
}

/// Runs in a pool worker for the rest of its life: waits for its rayon thread,
/// then runs rayon's work loop.
#[wasm_bindgen(js_name = runPoolThread)]
pub fn run_pool_thread(receiver: usize) -> Result<(), JsError> {
    // SAFETY: `receiver` is `ThreadPool::receiver` of a pool that JS keeps
    // alive for the page's life; a Mutex is Sync, so sharing it between the
    // workers (threads on one shared memory) is sound.
    let receiver = unsafe { &*(receiver as *const Mutex<Receiver<ThreadBuilder>>) };
    let thread = receiver
        .lock()
        .map_err(|_| JsError::new("the thread pool's channel is poisoned"))?
        .recv()
        .map_err(|_| JsError::new("the thread pool was dropped before it started this worker"))?;
    thread.run();
    Ok(())
}

//! Host bindings for the plugin world in `wit/`.

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "plugin",
    // Waiting for an LLM is the one host call that awaits I/O; the rest answer synchronously.
    imports: {
        "storehost:plugin/llm.complete": async | trappable,
        default: trappable,
    },
    exports: { default: async },
});

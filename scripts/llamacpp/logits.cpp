// What llama.cpp computes for a prompt: its tokens, the logits at every prompt position, and a
// greedy continuation. Built against libllama by scripts/llamacpp/build.sh; driven by
// scripts/llamacpp_check.py, which compares the numbers with transformers.
//
//   lp-logits MODEL.gguf PROMPT N_GEN OUT.bin [THREADS] [exact|defaults|time]
// stdout: "tokens: 1 2 3", "greedy: 4 5 6", "text: ..." (the continuation, llama.cpp's detokenizer)
// OUT.bin: float32 [n_prompt, n_vocab], row-major. The KV cache is float32 and flash attention
// off, so that the comparison measures the exported file; "defaults" keeps llama.cpp's defaults;
// "time" also prints "cpu: N_PROMPT PROMPT_CPU_S N_GEN GEN_CPU_S" (tokens per CPU second, for a busy machine).
#include "llama.h"

#include <cstdio>
#include <ctime>
#include <cstdlib>
#include <string>
#include <vector>

static double cpu_seconds() {  // this process's CPU time: robust to other work on the machine
    timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT N_GEN OUT.bin [THREADS] [exact|defaults|time]\n", argv[0]);
        return 2;
    }
    const std::string prompt = argv[2];
    const int n_gen = atoi(argv[3]);
    const int threads = argc > 5 ? atoi(argv[5]) : 2;
    const std::string mode = argc > 6 ? argv[6] : "exact";
    const bool timing = mode == "time";  // llama.cpp's defaults, all N_GEN tokens, CPU seconds printed
    const bool defaults = mode == "defaults" || timing;
    llama_log_set(quiet, nullptr);
    llama_backend_init();

    llama_model_params mparams = llama_model_default_params();
    mparams.progress_callback = [](float, void *) { return true; };  // no progress dots
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) { fprintf(stderr, "llama.cpp could not load %s\n", argv[1]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    std::vector<llama_token> tokens(prompt.size() + 8);
    const int n = llama_tokenize(vocab, prompt.c_str(), (int) prompt.size(), tokens.data(), (int) tokens.size(), true, false);
    if (n <= 0) { fprintf(stderr, "tokenizing failed\n"); return 1; }
    tokens.resize(n);

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n + n_gen + 8;
    cparams.n_batch = cparams.n_ubatch = n;
    cparams.n_threads = cparams.n_threads_batch = threads;
    if (!defaults) {
        // exact: llama.cpp's defaults (f16 KV cache, CPU flash attention in f16) round k, v and scores
        cparams.type_k = cparams.type_v = GGML_TYPE_F32;
        cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) { fprintf(stderr, "could not create a context\n"); return 1; }

    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;  // logits at every position
    }
    batch.n_tokens = n;
    double start = cpu_seconds();
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    const double prompt_seconds = cpu_seconds() - start;

    FILE * out = fopen(argv[4], "wb");
    for (int i = 0; i < n; ++i) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, out);
    fclose(out);

    printf("tokens:");
    for (int i = 0; i < n; ++i) printf(" %d", tokens[i]);
    printf("\ngreedy:");
    std::string text;
    llama_token next = 0;
    const float * logits = llama_get_logits_ith(ctx, n - 1);
    int generated = 0;
    start = cpu_seconds();
    for (int step = 0; step < n_gen; ++step) {
        next = 0;
        for (int v = 1; v < n_vocab; ++v) if (logits[v] > logits[next]) next = v;
        printf(" %d", next);
        char piece[256];
        const int len = llama_token_to_piece(vocab, next, piece, sizeof(piece), 0, false);
        if (len > 0) text.append(piece, len);
        ++generated;
        if (llama_vocab_is_eog(vocab, next) && !timing) break;
        llama_batch one = llama_batch_get_one(&next, 1);
        if (llama_decode(ctx, one) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
        logits = llama_get_logits_ith(ctx, -1);
    }
    const double gen_seconds = cpu_seconds() - start;
    printf("\ntext: %s\n", text.c_str());
    if (timing) printf("cpu: %d %.6f %d %.6f\n", n, prompt_seconds, generated, gen_seconds);

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}

/* Generate text from a wkvc plan through the C ABI (capi/include/wkvc.h), greedy, streamed:
 * prints the prompt and then each piece as it comes, like `wkvc run PLAN -p PROMPT -n N`.
 *
 *   cc examples/c/generate.c -Icapi/include -Ltarget/release -lwkvc -o generate
 *   LD_LIBRARY_PATH=target/release ./generate smollm2.wkv "The capital of France is" 32
 */
#include <stdio.h>
#include <stdlib.h>
#include "wkvc.h"

static int print_piece(void *user, const char *piece) {
    (void)user;
    fputs(piece, stdout);
    fflush(stdout);
    return 0; /* go on */
}

static int fail(const char *what) {
    fprintf(stderr, "error: %s: %s\n", what, wkvc_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PLAN PROMPT [MAX_TOKENS]\n", argv[0]);
        return 2;
    }
    unsigned max_tokens = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 10) : 32;
    wkvc_model *model = NULL;
    wkvc_engine *engine = NULL;
    wkvc_session *session = NULL;
    int rc = 0;
    if (wkvc_model_open(argv[1], &model) != WKVC_STATUS_OK) return fail("open");
    if (wkvc_engine_new(model, 2, &engine) != WKVC_STATUS_OK) { rc = fail("engine"); goto out; }
    if (wkvc_session_new(engine, 2048, &session) != WKVC_STATUS_OK) { rc = fail("session"); goto out; }
    fputs(argv[2], stdout);
    uint32_t n = 0;
    if (wkvc_generate(session, argv[2], max_tokens, 0.0f, 1.0f, 0, print_piece, NULL, &n) !=
        WKVC_STATUS_OK) {
        rc = fail("generate");
        goto out;
    }
    fputs("\n", stdout);
    fprintf(stderr, "[%u tokens]\n", n);
out:
    wkvc_session_free(session);
    wkvc_engine_free(engine);
    wkvc_model_free(model);
    return rc;
}

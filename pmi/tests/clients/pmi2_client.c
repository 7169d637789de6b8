/* A PMI-2 client on Slurm's libpmi2: init, job id, put, fence, get of the neighbour's key,
 * the process mapping, finalize. Prints "OK rank/size mapping". With PMI2_TEST_EXIT_RANK=r, rank r
 * exits before the first fence. */
#include <slurm/pmi2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHECK(call) do { int rc_ = (call); if (rc_ != PMI2_SUCCESS) { \
    fprintf(stderr, "%s failed: %d\n", #call, rc_); return 1; } } while (0)

int main(void)
{
    int spawned, size, rank, appnum, vallen, found;
    char jobid[256], key[64], val[1024], want[1024], map[1024];

    CHECK(PMI2_Init(&spawned, &size, &rank, &appnum));
    CHECK(PMI2_Job_GetId(jobid, sizeof(jobid)));
    snprintf(key, sizeof(key), "key-%d", rank);
    snprintf(val, sizeof(val), "value-from-%d;semicolon", rank);
    CHECK(PMI2_KVS_Put(key, val));
    /* Fault test: this rank leaves before the fence, without finalizing. */
    const char *leave = getenv("PMI2_TEST_EXIT_RANK");
    if (leave && atoi(leave) == rank)
        _exit(3);
    CHECK(PMI2_KVS_Fence());
    int peer = (rank + 1) % size;
    snprintf(key, sizeof(key), "key-%d", peer);
    snprintf(want, sizeof(want), "value-from-%d;semicolon", peer);
    CHECK(PMI2_KVS_Get(jobid, PMI2_ID_NULL, key, val, sizeof(val), &vallen));
    if (strcmp(val, want) != 0) {
        fprintf(stderr, "rank %d: got %s=%s, want %s\n", rank, key, val, want);
        return 1;
    }
    CHECK(PMI2_Info_GetJobAttr("PMI_process_mapping", map, sizeof(map), &found));
    if (!found) {
        fprintf(stderr, "rank %d: no PMI_process_mapping\n", rank);
        return 1;
    }
    CHECK(PMI2_KVS_Fence());
    CHECK(PMI2_Finalize());
    printf("OK %d/%d %s %s\n", rank, size, jobid, map);
    return 0;
}

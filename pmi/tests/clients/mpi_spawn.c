/* MPI_Comm_spawn against a process manager that does not spawn: the call must return an error
 * (with MPI_ERRORS_RETURN) instead of hanging. Prints "spawn rc=<code> <message>". */
#include <mpi.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN);
    MPI_Comm child;
    int errs[1];
    int rc = MPI_Comm_spawn("/bin/true", MPI_ARGV_NULL, 1, MPI_INFO_NULL, 0, MPI_COMM_SELF,
                            &child, errs);
    char text[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    if (rc != MPI_SUCCESS)
        MPI_Error_string(rc, text, &len);
    printf("spawn rc=%d %s\n", rc, text);
    MPI_Finalize();
    return 0;
}

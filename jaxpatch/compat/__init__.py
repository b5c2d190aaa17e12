"""Drop-in APIs of other libraries, running on jaxpatch's engine."""

"""The test suite: unit/ (pure logic), service/ (the ASGI app), integration/ (real servers),
containers/ (the image and the stack); support/ is the harness they, and loadtests/, start servers with."""
